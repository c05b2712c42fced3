"""Linear probing of a frozen encoder on the paper's six benchmarks or any local imagefolder:
`run_linear_probe(LinearProbeSettings(...))` extracts features once per (model, dataset revision, split,
preprocessing) into the feature cache, trains each protocol on the cache and writes one record per (task,
protocol) and the Table 1 report. The command line (`exaonepath-probe`, its usage and every flag):
`cli`; `python -m` / `accelerate launch -m exaonepath_hf.eval.patch.linear_probe` runs it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import evaluate
import torch
from accelerate import PartialState

from ...atomic_io import atomic_save_tensors, write_json
from ...stain_normalization import StainReference
from ..common.data import SPLIT_NAMES
from ..common.encoders import Encoder, Pooling, Preprocessing, load_encoder
from ..common.features import ExtractionSettings, FeatureSet, cache_key, distributed_state
from ..common.metrics import METRIC_KEYS, METRIC_PATH, load_metric
from ..common.records import environment, slugify, summarize_seeds
from .probes import PRESETS, FeatureSplit, ProbeConfig, fit_linear_probe, predict
from .report import RECORD_SUFFIX, write_report
from .tasks import PAPER_TASK_ORDER, TaskData, TaskSpec, get_task, imagefolder_task, load_task

__all__ = [
    "LinearProbeSettings",
    "select_tasks",
    "imagefolder_task_name",
    "probe_configs",
    "extract_task_features",
    "run_probe",
    "probe_task",
    "run_linear_probe",
]

logger = logging.getLogger(__name__)


def imagefolder_task_name(data_dir: str | Path) -> str:
    """`imagefolder-<folder name>-<digest of its absolute path>`: the task's name in records and the report,
    and its folder of records, so that probes of two imagefolders keep both records while a rerun on the same
    folder replaces its own (two folders may share a name, hence the digest)."""
    folder = Path(data_dir).resolve()
    return f"imagefolder-{slugify(folder.name)}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"


def extract_task_features(
    encoder: Encoder,
    task: TaskData,
    preprocessing: Preprocessing,
    extraction: ExtractionSettings,
    state: PartialState | None = None,
) -> dict[str, FeatureSet]:
    """Features of every split of `task`, from the cache when an earlier run extracted them."""
    features = {}
    for split in SPLIT_NAMES:
        key = cache_key(
            encoder,
            task.dataset_id,
            task.dataset_revision,
            task.fingerprint(split),
            split,
            preprocessing,
            extraction.forward.precision,
        )
        features[split] = extraction.extract(encoder, task.splits[split], preprocessing, key, state=state)
    return features


def run_probe(
    features: dict[str, FeatureSet],
    config: ProbeConfig,
    num_classes: int,
    metric: evaluate.EvaluationModule,
    device: str,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Train `config` for each of its seeds; test metrics per seed and mean ± sd; test probabilities [S, N, C]."""
    train, val, test = (FeatureSplit(features[s].features, features[s].labels) for s in SPLIT_NAMES)
    per_seed, probabilities = [], []
    for seed in config.seeds:
        fit = fit_linear_probe(train, val, config, num_classes, seed=seed, device=device)
        probs = predict(fit.linear, test.features)
        scores = probs[:, 1] if num_classes == 2 else probs
        result = metric.compute(
            predictions=probs.argmax(dim=1).tolist(),
            references=test.labels.tolist(),
            scores=scores.tolist(),
            num_classes=num_classes,
        )
        result.update(
            seed=seed,
            selected_step=fit.selected_step,
            selected_l2=fit.l2,
            selected_val_score=fit.selected_val_score,
            history=fit.history,
        )
        per_seed.append(result)
        probabilities.append(probs)
        logger.info(
            "%s seed %d: top1 %.4f, balanced %.4f",
            config.name,
            seed,
            result["top1"],
            result["balanced_accuracy"],
        )
    return {"per_seed": per_seed, "summary": summarize_seeds(per_seed, METRIC_KEYS)}, torch.stack(
        probabilities
    )


def probe_configs(
    protocols: Sequence[str],
    iterations: int | None = None,
    eval_every: int | None = None,
    seeds: Sequence[int] | None = None,
) -> list[ProbeConfig]:
    """The `PRESETS` named in `protocols`, with the given overrides (iterations and interval: not L-BFGS)."""
    unknown = [name for name in protocols if name not in PRESETS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {sorted(PRESETS)}")
    configs = []
    for name in protocols:
        config = PRESETS[name]
        overrides: dict[str, Any] = {}
        if iterations is not None and config.optimizer != "lbfgs":
            overrides["iterations"] = iterations
        if eval_every is not None and config.optimizer != "lbfgs":
            overrides["eval_every"] = eval_every
        if seeds is not None:
            overrides["seeds"] = tuple(seeds)
        configs.append(dataclasses.replace(config, **overrides))
    return configs


def _print_summary(task: TaskData, protocol: str, summary: dict[str, Any]) -> None:
    print(
        f"{task.spec.display_name} [{protocol}] "
        + ", ".join(
            f"{k} {summary[k]['mean']:.4f}" + (f"±{summary[k]['sd']:.4f}" if summary[k]["n"] > 1 else "")
            for k in METRIC_KEYS
            if summary[k]["mean"] is not None
        )
    )


def probe_task(
    encoder: Encoder,
    task: TaskData,
    features: dict[str, FeatureSet],
    preprocessing: Preprocessing,
    configs: Sequence[ProbeConfig],
    output_dir: str | Path,
    metric: evaluate.EvaluationModule,
    model_label: str | None = None,
    probe_device: str = "cpu",
) -> list[Path]:
    """Train every protocol of `configs` on one task's cached features; write records and predictions.

    Returns the written record files, `output_dir/<model label>/<task>/<protocol>.record.json`.
    """
    model_label = model_label or Path(encoder.source).name
    out_dir = Path(output_dir) / slugify(model_label) / task.spec.name
    written = []
    for config in configs:
        results, probabilities = run_probe(features, config, len(task.class_names), metric, probe_device)
        test = features["test"]
        record = {
            "task": {**task.spec.to_dict(), "class_names": list(task.class_names)},
            "dataset": {
                "id": task.dataset_id,
                "revision": task.dataset_revision,
                "fingerprints": {s: task.fingerprint(s) for s in SPLIT_NAMES},
                "provenance": task.provenance,
            },
            "model": {**encoder.identity(), "label": model_label},
            "preprocessing": preprocessing.to_dict(),
            "extraction": {
                split: fs.extraction_record(preprocessing.stain_normalize) for split, fs in features.items()
            },
            "probe": {
                **config.to_dict(),
                "model_selection": f"best validation {config.selection_metric} over evaluations every "
                f"{config.eval_every} steps (ties keep the earlier step), restored before testing"
                if config.optimizer != "lbfgs"
                else f"best validation {config.selection_metric} over l2_grid",
                "metric_module": str(METRIC_PATH),
            },
            "results": results,
            "environment": environment(),
        }
        record_path = out_dir / (config.name + RECORD_SUFFIX)
        atomic_save_tensors(
            out_dir / f"{config.name}.predictions.safetensors",
            {"probabilities": probabilities, "labels": test.labels, "indices": test.indices},
        )
        write_json(record_path, record)
        written.append(record_path)
        _print_summary(task, config.name, results["summary"])
    return written


@dataclass(frozen=True)
class LinearProbeSettings:
    """One `exaonepath-probe` run: the encoder, the task(s), the preprocessing, the protocols, the outputs.

    `task` is a key of `TASKS`, "all" (the six, local ones from `data_root/<task>`, skipped when absent) or
    "imagefolder" (`data_dir`, split as `val_fraction` / `test_fraction` / `split_seed` say; the task is named
    after the folder, `imagefolder_task_name`).
    """

    model: str
    task: str
    revision: str | None = None
    label: str | None = None
    pooling: Pooling = "auto"
    data_dir: Path | None = None
    data_root: Path | None = None
    dataset_revision: str | None = None
    class_names: tuple[str, ...] | None = None
    val_fraction: float = 0.2
    test_fraction: float | None = None
    split_seed: int = 42
    stain_normalize: bool = True
    stain_reference: StainReference | None = None
    protocols: tuple[str, ...] = ("paper",)
    iterations: int | None = None
    eval_every: int | None = None
    seeds: tuple[int, ...] | None = None
    output_dir: Path = Path("results/linear_probe")
    probe_device: str | None = None
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)


def select_tasks(
    task: str,
    data_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 42,
) -> list[tuple[TaskSpec, Path | None]]:
    """(spec, data folder) of each task `task` names; see `LinearProbeSettings`."""
    data_dir = Path(data_dir) if data_dir is not None else None
    if task == "imagefolder":
        if data_dir is None:
            raise ValueError("--task imagefolder needs --data_dir")
        name = imagefolder_task_name(data_dir)
        return [(imagefolder_task(data_dir, class_names, val_fraction, split_seed, name), data_dir)]
    names = PAPER_TASK_ORDER if task == "all" else (task,)
    selected = []
    for name in names:
        spec = get_task(name)
        folder = data_dir if task != "all" else (Path(data_root) / name if data_root else None)
        if spec.is_local and (folder is None or not folder.is_dir()):
            if task != "all":
                raise ValueError(
                    f"{name} has no hub copy: build it with `exaonepath-convert-dataset {spec.converter} SRC --output_dir OUT` "
                    "and pass --data_dir OUT"
                )
            logger.warning("skipping %s: no imagefolder at %s (see exaonepath-convert-dataset)", name, folder)
            continue
        selected.append((spec, folder))
    return selected


def run_linear_probe(settings: LinearProbeSettings, state: PartialState | None = None) -> list[Path]:
    """Extract (or load) features, train every protocol on every task, write records and `report.md`.

    Returns the written record files (none on the processes other than the main one).
    """
    tasks = select_tasks(
        settings.task,
        settings.data_dir,
        settings.data_root,
        settings.class_names,
        settings.val_fraction,
        settings.split_seed,
    )
    configs = probe_configs(settings.protocols, settings.iterations, settings.eval_every, settings.seeds)
    state = state or distributed_state()
    encoder = load_encoder(
        settings.model, pooling=settings.pooling, revision=settings.revision, device=state.device
    )
    preprocessing = encoder.default_preprocessing(
        stain_normalize=settings.stain_normalize, stain_reference=settings.stain_reference
    )
    # every process extracts; only then does the main process train probes, so that no process waits at a
    # collective while another trains (a long wait would hit the process group's timeout)
    extracted = []
    for spec, data_dir in tasks:
        task = load_task(
            spec, data_dir=data_dir, revision=settings.dataset_revision, test_fraction=settings.test_fraction
        )
        extracted.append(
            (task, extract_task_features(encoder, task, preprocessing, settings.extraction, state))
        )
    if not state.is_main_process:
        return []
    metric = load_metric()
    probe_device = settings.probe_device or ("cuda" if torch.cuda.is_available() else "cpu")
    written = []
    for task, features in extracted:
        written += probe_task(
            encoder,
            task,
            features,
            preprocessing,
            configs,
            settings.output_dir,
            metric,
            settings.label,
            probe_device,
        )
    if written:
        report = write_report(settings.output_dir)
        print(f"records: {', '.join(map(str, written))}\nreport: {report}")
    return written


if __name__ == "__main__":
    from .cli import probe_main

    raise SystemExit(probe_main())
