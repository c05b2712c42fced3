"""DINO pretraining parts, one module each: `head`, `loss`, `schedules`, `teacher` (EMA), `augmentations`
(multi-crop on the CPU) and `gpu_augment` (batched on the device), `data` and `shuffle` (streaming patches),
`checkpoint`, `config` (typed YAML) and `config_files` (the packaged YAMLs); `loop` runs them with Accelerate
and `throughput` times its step. `exaonepath_hf.train.pretrain_dino` is the command.

Nothing is imported here: the command answers `--help` without torch, and each part is imported from its
module.
"""
