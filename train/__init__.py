"""Training recipes for EXAONEPath, installed as `exaonepath_hf.train` (from the repository's `train/`).

`exaonepath_hf.train.pretrain_dino` (console script `exaonepath-pretrain`) reproduces the paper's DINO
pretraining with Accelerate; its parts live in `exaonepath_hf.train.dino`. The YAML configs ship as package
data in `configs/` (training) and `accelerate_configs/` (launchers).
"""
