"""Does the encoder follow the tissue or the site? `run_robustness(RobustnessSettings(...))` extracts (cached)
the features of every model under every input setting (raw, Macenko-normalized) and measures them the field's
way (`measures`, `metrics`, `report.assess_robustness`). The measures, the data layouts, the outputs and the
command line (`exaonepath-robustness`): `cli` (`ROBUSTNESS_DESCRIPTION`, which `--help` prints).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from ...atomic_io import write_json
from ..common.encoders import Pooling, load_encoder
from ..common.extraction import ForwardSettings
from ..common.features import ExtractionSettings, FeatureSet, cache_key, distributed_state
from ..common.records import environment
from .measures import MetricOptions
from .protocol import VIRTUAL_LABS_NOTE, as_virtual_slides, build_virtual_labs, virtual_labs_for
from .report import RobustnessInput, RobustnessOutputs, assess_robustness
from .samples import RobustnessSamples, load_robustness_samples
from .tasks import ROBUSTNESS_TASKS, get_robustness_task

__all__ = ["SETTINGS", "RobustnessSettings", "run_robustness"]

logger = logging.getLogger(__name__)

#: Input settings: the name in the outputs -> Macenko on or off.
SETTINGS = {"raw": False, "macenko": True}


@dataclass(frozen=True)
class RobustnessSettings:
    """One `exaonepath-robustness` run (see `cli.ROBUSTNESS_DESCRIPTION`); `names` label the models in the
    outputs.

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
                "extraction": features.extraction_record(preprocessing.stain_normalize),
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
    """Extract, measure and report (see `cli.ROBUSTNESS_DESCRIPTION`); returns the outputs (None on the
    other processes under `accelerate launch`)."""
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


if __name__ == "__main__":
    from .cli import robustness_main

    raise SystemExit(robustness_main())
