"""Linear probing of a frozen encoder on the paper's six benchmarks or any local imagefolder.

    python -m eval.linear_probe --model PATH_OR_HUB_ID --task crc100k
    python -m eval.linear_probe --model PATH --task all --data_root /data/benchmarks   # mhist/ til/ msi_crc/ msi_stad/
    python -m eval.linear_probe --model PATH --task imagefolder --data_dir DIR --test_fraction 0.25
    accelerate launch -m eval.linear_probe ...     # feature extraction across processes / nodes

Features are extracted once per (model, dataset revision, split, preprocessing) into the feature cache,
then each protocol (`--protocol paper eva lbfgs`) trains on the cache. Each (task, protocol) writes
`OUTPUT/<model>/<task>/<protocol>.record.json` (every setting, versions, revisions, metrics per seed,
mean ± sd) and `<protocol>.predictions.safetensors`; `OUTPUT/report.md` renders the paper's Table 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import evaluate
import torch
from accelerate import PartialState

from ..atomic_io import atomic_save_tensors, write_json

from .backbones import Encoder, Preprocessing, load_encoder
from .features import FeatureSet, cache_key, default_cache_root, distributed_state, extract_features
from .probes import PRESETS, FeatureSplit, ProbeConfig, fit_linear_probe, predict, summarize_seeds
from .report import RECORD_SUFFIX, environment, write_report
from .tasks import PAPER_TASK_ORDER, SPLIT_NAMES, TaskData, get_task, imagefolder_task, load_task

__all__ = ["METRIC_PATH", "load_metric", "extract_task_features", "run_probe", "probe_task", "main"]

logger = logging.getLogger("eval.linear_probe")

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "pathology_metrics.py"
METRIC_KEYS = ("top1", "balanced_accuracy", "macro_f1", "auroc")


def load_metric() -> evaluate.EvaluationModule:
    """The project's metric module, loaded by path (works offline)."""
    return evaluate.load(str(METRIC_PATH))


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_")[-80:] or "model"


def extract_task_features(
    encoder: Encoder,
    task: TaskData,
    preprocessing: Preprocessing,
    args: argparse.Namespace,
    state: PartialState,
) -> dict[str, FeatureSet]:
    features = {}
    for split in SPLIT_NAMES:
        key = cache_key(
            encoder,
            task.dataset_id,
            task.dataset_revision,
            task.fingerprint(split),
            split,
            preprocessing,
            args.precision,
        )
        features[split] = extract_features(
            encoder,
            task.splits[split],
            preprocessing,
            key,
            args.cache_dir,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            chunk_size=args.chunk_size,
            precision=args.precision,
            state=state,
        )
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


def _probe_config(name: str, args: argparse.Namespace) -> ProbeConfig:
    config = PRESETS[name]
    overrides = {}
    if args.iterations is not None and config.optimizer != "lbfgs":
        overrides["iterations"] = args.iterations
    if args.eval_every is not None and config.optimizer != "lbfgs":
        overrides["eval_every"] = args.eval_every
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    return dataclasses.replace(config, **overrides)


def probe_task(
    encoder: Encoder,
    task: TaskData,
    features: dict[str, FeatureSet],
    preprocessing: Preprocessing,
    args: argparse.Namespace,
    metric: evaluate.EvaluationModule,
) -> list[Path]:
    """Train every requested protocol on one task's cached features; write records and predictions."""
    model_label = args.label or Path(encoder.source).name
    out_dir = Path(args.output_dir) / slugify(model_label) / task.spec.name
    written = []
    for protocol in args.protocol:
        config = _probe_config(protocol, args)
        results, probabilities = run_probe(features, config, len(task.class_names), metric, args.probe_device)
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
                split: {
                    **fs.stats,
                    "num_features": len(fs),
                    "failed_images": len(fs.failed),
                    "stain_fallbacks": int((~fs.stain_normalized).sum())
                    if preprocessing.stain_normalize
                    else 0,
                }
                for split, fs in features.items()
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
        stem = out_dir / protocol
        atomic_save_tensors(
            stem.with_suffix(".predictions.safetensors"),
            {"probabilities": probabilities, "labels": test.labels, "indices": test.indices},
        )
        write_json(stem.with_name(protocol + RECORD_SUFFIX), record)
        written.append(stem.with_name(protocol + RECORD_SUFFIX))
        summary = results["summary"]
        print(
            f"{task.spec.display_name} [{protocol}] "
            + ", ".join(
                f"{k} {summary[k]['mean']:.4f}" + (f"±{summary[k]['sd']:.4f}" if summary[k]["n"] > 1 else "")
                for k in METRIC_KEYS
                if summary[k]["mean"] is not None
            )
        )
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="folder, hub id, .ckpt/state-dict file, timm:NAME or hf-hub:ORG/NAME"
    )
    parser.add_argument("--revision", default=None, help="model revision on the hub")
    parser.add_argument("--label", default=None, help="model name in the report (default: folder / id name)")
    parser.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto")
    parser.add_argument("--task", required=True, choices=(*PAPER_TASK_ORDER, "all", "imagefolder"))
    parser.add_argument(
        "--data_dir", type=Path, help="imagefolder of a local task (or of --task imagefolder)"
    )
    parser.add_argument(
        "--data_root", type=Path, help="with --task all: folder holding mhist/ til/ msi_crc/ msi_stad/"
    )
    parser.add_argument("--dataset_revision", default=None, help="hub dataset revision")
    parser.add_argument("--class_names", default=None, help="imagefolder: comma-separated label order to pin")
    parser.add_argument(
        "--val_fraction", type=float, default=0.2, help="imagefolder without val: share of train"
    )
    parser.add_argument(
        "--test_fraction", type=float, default=None, help="imagefolder without test: share held out"
    )
    parser.add_argument("--split_seed", type=int, default=42)
    parser.add_argument(
        "--stain_normalize",
        choices=("on", "off"),
        default="on",
        help="Macenko before resize/crop (the paper: on, also for already-normalized sets)",
    )
    parser.add_argument(
        "--stain_reference", type=Path, default=None, help="JSON with stain_matrix, max_concentrations"
    )
    parser.add_argument("--protocol", nargs="+", choices=sorted(PRESETS), default=["paper"])
    parser.add_argument("--iterations", type=int, default=None, help="override the protocol's iterations")
    parser.add_argument("--eval_every", type=int, default=None, help="override the validation interval")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the protocol's seeds")
    parser.add_argument(
        "--cache_dir", type=Path, default=None, help="feature cache (default $EXAONEPATH_FEATURE_CACHE)"
    )
    parser.add_argument("--output_dir", type=Path, default=Path("results/linear_probe"))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--chunk_size", type=int, default=4096, help="rows per resumable cache chunk")
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto = bf16 on GPU"
    )
    parser.add_argument(
        "--probe_device", default=None, help="device for probe training (default: cuda if available)"
    )
    return parser


def _tasks(args: argparse.Namespace) -> list[tuple[Any, Path | None]]:
    if args.task == "imagefolder":
        if args.data_dir is None:
            raise SystemExit("--task imagefolder needs --data_dir")
        class_names = args.class_names.split(",") if args.class_names else None
        return [
            (imagefolder_task(args.data_dir, class_names, args.val_fraction, args.split_seed), args.data_dir)
        ]
    names = PAPER_TASK_ORDER if args.task == "all" else (args.task,)
    selected = []
    for name in names:
        spec = get_task(name)
        data_dir = (
            args.data_dir if args.task != "all" else (args.data_root / name if args.data_root else None)
        )
        if spec.is_local and (data_dir is None or not data_dir.is_dir()):
            if args.task != "all":
                raise SystemExit(
                    f"{name} has no hub copy: build it with `python -m eval.converters {spec.converter} SRC OUT` "
                    "and pass --data_dir OUT"
                )
            logger.warning("skipping %s: no imagefolder at %s (see eval.converters)", name, data_dir)
            continue
        selected.append((spec, data_dir))
    return selected


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = distributed_state()
    args.cache_dir = args.cache_dir or default_cache_root()
    args.probe_device = args.probe_device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_encoder(args.model, pooling=args.pooling, revision=args.revision, device=state.device)
    reference = None
    if args.stain_reference is not None:
        from ..stain_normalization import StainReference

        reference = StainReference.from_dict(json.loads(args.stain_reference.read_text()))
    preprocessing = encoder.default_preprocessing(
        stain_normalize=args.stain_normalize == "on", stain_reference=reference
    )
    # every process extracts; only then does the main process train probes, so that no process waits at a
    # collective while another trains (a long wait would hit the process group's timeout)
    extracted = []
    for spec, data_dir in _tasks(args):
        task = load_task(
            spec, data_dir=data_dir, revision=args.dataset_revision, test_fraction=args.test_fraction
        )
        extracted.append((task, extract_task_features(encoder, task, preprocessing, args, state)))
    if not state.is_main_process:
        return []
    metric = load_metric()
    written = []
    for task, features in extracted:
        written += probe_task(encoder, task, features, preprocessing, args, metric)
    if written:
        report = write_report(args.output_dir)
        print(f"records: {', '.join(map(str, written))}\nreport: {report}")
    return written


if __name__ == "__main__":
    main()
