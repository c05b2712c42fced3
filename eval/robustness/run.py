"""Does the encoder follow the tissue or the site? The field's robustness measures, raw vs Macenko input, model
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

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from ...atomic_io import write_json
from ...cli import run_command
from ..common.encoders import Pooling, load_encoder
from ..common.extraction import ForwardSettings
from ..common.features import (
    ExtractionSettings,
    FeatureSet,
    add_extraction_arguments,
    cache_key,
    distributed_state,
    extraction_settings,
)
from ..common.records import environment
from .measures import MetricOptions
from .protocol import VIRTUAL_LABS_NOTE, as_virtual_slides, build_virtual_labs, virtual_labs_for
from .report import RobustnessInput, RobustnessOutputs, assess_robustness
from .samples import RobustnessSamples, load_robustness_samples
from .tasks import ROBUSTNESS_TASKS, get_robustness_task

__all__ = ["SETTINGS", "RobustnessSettings", "run_robustness", "build_parser", "settings_from_args", "main"]

logger = logging.getLogger(__name__)

#: Input settings: the name in the outputs -> Macenko on or off.
SETTINGS = {"raw": False, "macenko": True}


@dataclass(frozen=True)
class RobustnessSettings:
    """One `exaonepath-robustness` run (see the module docstring); `names` label the models in the outputs.

    `k=None` takes the task's robustness-index k (PathoROB's), else 11.
    """

    models: tuple[str, ...]
    data: str | os.PathLike | None = None
    task: str | None = None
    names: tuple[str, ...] | None = None
    virtual_labs: bool = False
    lab_data: str | os.PathLike | None = None
    tile: int | None = None
    input_settings: tuple[str, ...] = ("raw", "macenko")
    k: int | None = None
    bootstrap: int = 1000
    neighbours: int = 5
    restarts: int = 10
    pooling: Pooling = "auto"
    output_dir: Path = Path("results/robustness")
    save_features: bool = False
    seed: int = 0
    extraction: ExtractionSettings = field(
        default_factory=lambda: ExtractionSettings(forward=ForwardSettings(num_workers=2))
    )

    def validate(self) -> None:
        if not self.models:
            raise ValueError("give at least one --model")
        if self.names is not None and len(self.names) != len(self.models):
            raise ValueError("give one --name per --model")
        unknown = [name for name in self.input_settings if name not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown input setting(s) {unknown}; choose from {sorted(SETTINGS)}")
        if self.task is not None:
            get_robustness_task(self.task)
        if self.virtual_labs and (self.task is not None or self.data is None):
            raise ValueError("--virtual_labs re-stains the labelled images of --data; it takes no --task")
        if self.lab_data is not None and not self.virtual_labs:
            raise ValueError("--lab_data holds the Reinhard targets of --virtual_labs; add --virtual_labs")

    def model_names(self) -> list[str]:
        names = list(self.names) if self.names else [Path(m).name or str(m) for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models {duplicates} share a name in the outputs; tell them apart with --name")
        return names

    def metric_options(self, task_k: int | None) -> MetricOptions:
        return MetricOptions(
            k=self.k or task_k or MetricOptions.k,
            bootstrap=self.bootstrap,
            neighbours=self.neighbours,
            restarts=self.restarts,
            seed=self.seed,
        )


def _extract_all(
    settings: RobustnessSettings, samples: RobustnessSamples, names: Sequence[str], state: PartialState
) -> list[tuple[str, str, dict[str, Any], FeatureSet]]:
    extracted = []
    for source, name in zip(settings.models, names, strict=True):
        logger.info("loading %s", source)
        encoder = load_encoder(source, pooling=settings.pooling, device=state.device)
        for setting in settings.input_settings:
            preprocessing = encoder.default_preprocessing(stain_normalize=SETTINGS[setting])
            key = cache_key(
                encoder, samples.source, "local", samples.fingerprint, "robustness", preprocessing,
                settings.extraction.forward.precision,
            )  # fmt: skip
            logger.info("features of %s, %s input", name, setting)
            features = settings.extraction.extract(encoder, samples.dataset, preprocessing, key, state=state)
            details = {
                "model_source": str(source),
                "model_identity": encoder.identity(),
                "preprocessing": preprocessing.to_dict(),
                "extraction": {**features.stats, "failed_images": len(features.failed)},
            }
            extracted.append((name, setting, details, features))
    return extracted


def _common_rows(extracted: Sequence[tuple[str, str, dict[str, Any], FeatureSet]]) -> list[int]:
    """Dataset rows every (model, setting) could read: all measures compare the same samples."""
    common = set(extracted[0][3].indices.tolist())
    for *_, features in extracted[1:]:
        common &= set(features.indices.tolist())
    return sorted(common)


def _aligned(features: FeatureSet, rows: Sequence[int]) -> torch.Tensor:
    position = {int(row): i for i, row in enumerate(features.indices.tolist())}
    return features.features[torch.as_tensor([position[row] for row in rows], dtype=torch.long)]


def run_robustness(
    settings: RobustnessSettings, state: PartialState | None = None
) -> RobustnessOutputs | None:
    """Extract, measure and report (see the module docstring); returns the outputs (None on the other
    processes under `accelerate launch`)."""
    settings.validate()
    names = settings.model_names()
    state = state or distributed_state()
    out = Path(settings.output_dir)
    notes, labs = [], []
    data, task = settings.data, settings.task
    if settings.virtual_labs:
        data, labs = out / "virtual-labs", virtual_labs_for(settings.lab_data)
        if state.is_main_process:  # one writer; the other processes read the finished folder
            build_virtual_labs(settings.data, data, settings.lab_data)
        state.wait_for_everyone()
        notes.append(VIRTUAL_LABS_NOTE)
    samples = load_robustness_samples(data, task, settings.tile)
    if settings.virtual_labs:
        samples.table = as_virtual_slides(samples.table)
    task_name = samples.provenance.get("task")
    options = settings.metric_options(ROBUSTNESS_TASKS[task_name].k if task_name else None)
    logger.info("%s: %s", samples.source, samples.table.summary())
    # every process extracts; the measures (k-means, t-SNE) run afterwards on the main process only
    extracted = _extract_all(settings, samples, names, state)
    if not state.is_main_process:
        return None
    rows = _common_rows(extracted)
    left_out = len(samples.table) - len(rows)
    if left_out:
        logger.warning(
            "%d images unreadable by some model or setting are left out of every measure", left_out
        )
        notes.append(f"{left_out} unreadable images left out of every measure (see the extraction details)")
    table = samples.table.select(rows)
    inputs = [
        RobustnessInput(name, setting, _aligned(features, rows), table, details)
        for name, setting, details, features in extracted
    ]
    described = {"source": samples.source, "fingerprint": samples.fingerprint, **samples.provenance}
    outputs = assess_robustness(inputs, out, options, settings.save_features, described, notes)
    write_json(
        out / "run.json",
        {
            "data": {**described, "counts": table.summary(), "virtual_labs": [lab.to_dict() for lab in labs]},
            "models": dict(zip(names, map(str, settings.models), strict=True)),
            "options": options.__dict__,
            "input_settings": list(settings.input_settings),
            "environment": environment(),
        },
    )
    print(outputs.markdown.read_text(encoding="utf-8"))
    print(f"records: {outputs.json}; t-SNE: {', '.join(map(str, outputs.tsne))}")
    return outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-robustness",
        description=__doc__,
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
        choices=sorted(ROBUSTNESS_TASKS),
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
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["raw", "macenko"])
    parser.add_argument(
        "--k", type=int, default=None, help="robustness-index k (default: the task's, else 11)"
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of the RI interval")
    parser.add_argument("--neighbours", type=int, default=5, help="kNN k of the slide gap and slide identity")
    parser.add_argument("--restarts", type=int, default=10, help="k-means restarts of the clustering score")
    parser.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto")
    parser.add_argument("--output_dir", type=Path, default=Path("results/robustness"))
    parser.add_argument(
        "--save_features", action="store_true", help="also write features.safetensors and samples.csv"
    )
    add_extraction_arguments(parser, num_workers=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def settings_from_args(args: argparse.Namespace) -> RobustnessSettings:
    return RobustnessSettings(
        models=tuple(args.model),
        data=args.data,
        task=args.task,
        names=tuple(args.name) if args.name else None,
        virtual_labs=args.virtual_labs,
        lab_data=args.lab_data,
        tile=args.tile,
        input_settings=tuple(args.settings),
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("exaonepath-robustness", lambda: run_robustness(settings_from_args(args)))


if __name__ == "__main__":
    raise SystemExit(main())
