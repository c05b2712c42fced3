"""The robustness room's console script, light: `exaonepath-robustness`.

Its parser is built here, and `--help` and argument errors answered, without importing torch, datasets or
sklearn; `robustness_main(argv)` parses first and imports the library (`run`) only to build typed settings and
run. The choices that name registry entries (`ROBUSTNESS_TASK_NAMES`, `INPUT_SETTING_OF_SWITCH`) are spelled here,
and tests/test_architecture.py pins them to the registries (`tasks.ROBUSTNESS_TASKS`, `run.SETTINGS`).
`python -m exaonepath_hf.eval.robustness.run` runs the same `main`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...cli import (
    add_output_argument,
    add_quiet_argument,
    add_stain_normalization_argument,
    run_command,
)
from ..common.cli import add_extraction_arguments, extraction_settings

if TYPE_CHECKING:
    from .run import RobustnessSettings

__all__ = [
    "INPUT_SETTING_OF_SWITCH",
    "ROBUSTNESS_DESCRIPTION",
    "ROBUSTNESS_TASK_NAMES",
    "build_robustness_parser",
    "robustness_main",
    "robustness_settings",
]

#: `sorted(tasks.ROBUSTNESS_TASKS)`: the registered robustness tasks.
ROBUSTNESS_TASK_NAMES = ("pathorob-camelyon", "plism")
#: `run.SETTINGS` by `--stain_normalization` value: the input settings, Macenko-normalized and raw.
INPUT_SETTING_OF_SWITCH = {"on": "macenko", "off": "raw"}

ROBUSTNESS_DESCRIPTION = """\
Does the encoder follow the tissue or the site? The field's robustness measures, raw vs Macenko input, model
beside model.

For every model and input setting (raw, Macenko-normalized through the same `Preprocessing` as every other
evaluation) the features of `--data` are extracted (cached) and measured (`measures`, `metrics`):

- robustness index (PathoROB, Kömen et al., arXiv 2507.17845): among each query's k nearest samples of other
  cases, the share of "same class, other centre" in "same class, other centre" + "other class, same centre";
- clustering score (PathoROB): ARI(k-means, class) - ARI(k-means, centre);
- paired cosine and top-1 / top-10 retrieval of the same tissue under another condition (PLISM);
- within- minus cross-slide kNN class accuracy and the own slide's share of the 50 nearest neighbours
  (PANDA-PLUS-Bench, arXiv 2512.14922);
- secondary, the package's earlier collapse measures (they do not condition on the class): kNN slide
  identity, silhouette by slide, the share of variance between slides and between centres.

A metric the data cannot define (no labels, one centre, no pairs) is null, with its reason in the report.

    exaonepath-robustness --model A --model B --data crc-samples --virtual_labs --output_dir OUT
    exaonepath-robustness --model A --task pathorob-camelyon --output_dir OUT --save_features
    exaonepath-robustness --model A --data my-tiles --output_dir OUT      # folder with a metadata.csv

`--data` is a folder with a `metadata.csv` (`file_name`, `label`, `center`, `slide_id` or `case_id`,
optional `pair_id`), an `exaonepath-tile` output or parquet shards (`slide_id`; `label`, `center`, `case_id`,
`pair_id` when present), a registered task name (`pathorob-camelyon`, `plism`), or with `--task` a local copy
of that task's data. `--virtual_labs` takes labelled images (class subfolders, or a metadata.csv with `label`)
and first re-stains each of them as several virtual labs would (HED perturbations and Reinhard transfers, not
Macenko: see `virtual_labs`), giving centres and pairs with known truth; it tests stain only, not scanner
or tissue-processing differences.

Writes `OUT/robustness.json` (one record per model and setting: `{"model", "setting", "metrics", "reasons",
"results", "details"}`), `OUT/robustness.md`, `OUT/tsne_by_center.png` and `OUT/tsne_by_class.png`, `OUT/run.json`
(data, settings, environment), and with `--save_features` `OUT/features.safetensors` (one [N, D] tensor per
model and setting, named `<model>/<setting>`) with `OUT/samples.csv` (its rows' `file_name`, `label`,
`center`, `case_id`, `pair_id`, `slide_id`), so that anyone can recompute the numbers. In Python:
`run_robustness(RobustnessSettings(...))`, or `report.assess_robustness` on features you already have.
"""


def build_robustness_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-robustness",
        description=ROBUSTNESS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", action="append", required=True, help="repeat to compare models side by side"
    )
    parser.add_argument("--name", action="append", default=None, help="display name per --model")
    parser.add_argument(
        "--data",
        default=None,
        help="folder with metadata.csv, exaonepath-tile output, parquet, or a task name",
    )
    parser.add_argument(
        "--task",
        choices=ROBUSTNESS_TASK_NAMES,
        default=None,
        help="registered task (--data: a local copy)",
    )
    parser.add_argument(
        "--virtual_labs",
        action="store_true",
        help="re-stain the labelled images of --data as virtual labs first",
    )
    parser.add_argument(
        "--lab_data",
        default=None,
        help="folder with stain-templates/: adds the Reinhard labs of --virtual_labs",
    )
    parser.add_argument("--tile", type=int, default=None, help="cut each image into SIZE x SIZE tiles first")
    add_stain_normalization_argument(parser, compare=True)
    parser.add_argument(
        "--k", type=int, default=None, help="robustness-index k (default: the task's, else 11)"
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of the RI interval")
    parser.add_argument("--neighbours", type=int, default=5, help="kNN k of the slide gap and slide identity")
    parser.add_argument("--restarts", type=int, default=10, help="k-means restarts of the clustering score")
    parser.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto")
    add_output_argument(parser, "results folder", default=Path("results/robustness"))
    add_quiet_argument(parser)
    parser.add_argument(
        "--save_features", action="store_true", help="also write features.safetensors and samples.csv"
    )
    add_extraction_arguments(parser, num_workers=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def robustness_settings(args: argparse.Namespace) -> RobustnessSettings:
    """The parsed command line as typed settings."""
    from .run import RobustnessSettings

    return RobustnessSettings(
        models=tuple(args.model),
        data=args.data,
        task=args.task,
        names=tuple(args.name) if args.name else None,
        virtual_labs=args.virtual_labs,
        lab_data=args.lab_data,
        tile=args.tile,
        input_settings=tuple(INPUT_SETTING_OF_SWITCH[switch] for switch in args.stain_normalization),
        k=args.k,
        bootstrap=args.bootstrap,
        neighbours=args.neighbours,
        restarts=args.restarts,
        pooling=args.pooling,
        output_dir=args.output_dir,
        save_features=args.save_features,
        seed=args.seed,
        extraction=extraction_settings(args),
    )


def robustness_main(argv: Sequence[str] | None = None) -> int:
    args = build_robustness_parser().parse_args(argv)

    def command() -> None:
        from .run import run_robustness

        run_robustness(robustness_settings(args))

    return run_command(
        "exaonepath-robustness", command, quiet=args.quiet, libraries=("transformers", "datasets")
    )
