"""EXAONEPath pretraining: DINO on Macenko-normalized patches with Accelerate, from one CPU to 10 nodes x 8 GPUs.

`--config` takes a YAML file or the name of a packaged one (cpu_smoke, one_gpu, paper); any `section.key=value`
argument overrides it (e.g. run.max_steps=100 data.num_workers=4). The script runs as the console script
`exaonepath-pretrain`, as `python -m exaonepath_hf.train.pretrain_dino` or under `accelerate launch ... -m`.

    # one process (CPU or one GPU), tiny ViT; from a checkout the file runs too (python or accelerate launch)
    exaonepath-pretrain --config cpu_smoke data.source=tiles run.output_dir=runs/cpu_smoke
    accelerate launch train/pretrain_dino.py --config cpu_smoke data.source=tiles run.output_dir=runs/cpu_smoke
    # 2 CPU processes (gloo; no GPU needed)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        -m exaonepath_hf.train.pretrain_dino --config cpu_smoke data.source=tiles run.output_dir=runs/cpu_smoke
    # accelerate's --config_file takes a path: the packaged Accelerate configs live beside the training ones
    CONFIGS=$(python -c 'from importlib.resources import files; print(files("exaonepath_hf.train"))')
    # one GPU / one node of 8 GPUs
    accelerate launch --config_file $CONFIGS/accelerate_configs/single_gpu.yaml -m exaonepath_hf.train.pretrain_dino \\
        --config one_gpu data.source=/data/tiles model.init_weights=/models/vit_b16_imagenet
    accelerate launch --config_file $CONFIGS/accelerate_configs/8_gpus.yaml -m exaonepath_hf.train.pretrain_dino \\
        --config paper data.source=/data/tiles model.init_weights=/models/vit_b16_imagenet
    # the paper: 10 nodes x 8 A100, batch 5,120; run on every node with its rank
    accelerate launch --config_file $CONFIGS/accelerate_configs/multi_node.yaml --machine_rank $NODE_RANK \\
        --main_process_ip $HEAD_NODE -m exaonepath_hf.train.pretrain_dino --config paper data.source=...
    # continue exactly from the newest checkpoint / only export the teacher of the newest checkpoint
    ... -m exaonepath_hf.train.pretrain_dino --config paper ... --resume
    exaonepath-pretrain --config paper run.output_dir=... --export_only --push_to_hub my-org/exaonepath-dino

`data.source` has no default: pass it (a folder of patches, an `exaonepath-tile --out` folder, a shard glob or
a hub dataset id). Every run writes its resolved config (after the overrides) to `<run.output_dir>/config.yaml`
when it starts, and the run's checkpoints are read with the model it describes:

- `--export_only` exports the run as trained, whatever model `--config` describes: the saved config gives the
  model, the stain reference and the card's training config; the command gives only where to read and write
  (`run.output_dir`, `run.export_dir`, `run.push_to_hub`, `run.hub_private`), and one warning line names any
  model field of `--config` that was ignored.
- `--resume` stops with one line naming the model fields where `--config` differs from the saved config:
  resume with `--config <run.output_dir>/config.yaml` (plus overrides), or start a new run in another folder.
  Other fields (steps, lr, workers) may change on a resume.

A run folder from before runs saved their config is read with `--config`, as before; a checkpoint of another
shape then stops with one line. Bad input (a config typo or wrong type, a missing `data.source`, a rerun into a
folder with checkpoints without `--resume`, a push while the hub cannot be reached) stops before the first
step with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

if __package__ in (None, ""):
    # run as a file (`accelerate launch train/pretrain_dino.py ...`, as Hugging Face examples are run): the
    # relative imports below need the package, so hand over to the installed one
    from exaonepath_hf.train.pretrain_dino import main

    sys.exit(main())

from ..cli import add_output_argument, add_quiet_argument, run_command
from .dino.config_files import packaged_config_names

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = ", ".join(packaged_config_names())
    parser.add_argument("--config", required=True, help=f"a YAML file or a packaged config name ({names})")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--export_only", action="store_true", help="export the newest checkpoint's teacher")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload the exported backbone")
    parser.add_argument(
        "--stop_at_step",
        type=int,
        help="checkpoint and exit at this step (schedules still span the whole run)",
    )
    add_output_argument(parser, "the run folder, as run.output_dir=DIR", required=False)
    add_quiet_argument(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the YAML")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # parsed before the training library is imported: --help and bad flags answer at once
    args = build_parser().parse_args(None if argv is None else list(argv))
    overrides = [*args.overrides, *([f"run.output_dir={args.output_dir}"] if args.output_dir else [])]

    def run() -> int:
        from .dino.config import load_config
        from .dino.loop import RunOptions, pretrain

        options = RunOptions(
            resume=args.resume,
            export_only=args.export_only,
            push_to_hub=args.push_to_hub,
            stop_at_step=args.stop_at_step,
        )
        return pretrain(load_config(args.config, overrides), options)

    return run_command(
        "exaonepath-pretrain",
        run,
        interrupted="rerun the same command with --resume to continue from the last checkpoint",
        quiet=args.quiet,
        libraries=("transformers", "datasets"),
    )


if __name__ == "__main__":
    sys.exit(main())
