"""Evaluation speed: probe training on cached features, and feature extraction against the bare model.

    python benchmarks/bench_eval.py [--threads 2] [--rows 100000] [--images 64] [--skip_extraction]

Probe: the paper's protocol (SGD, batch 128, 12,500 iterations, validation every 250 steps) on 100k cached
768-d features (9 classes, plus 20k validation rows), as `exaonepath_hf.eval.patch.probes` runs it, against
the usual DataLoader(TensorDataset) loop with the same optimizer and against our loop with 2 intra-op threads.
The two peers run 1,250 iterations and are scaled to 12,500 (marked "extrapolated").

Extraction: images/s of `exaonepath_hf.eval.common.features.extract_features` (PNG decode, Macenko, resize
256, crop 224, normalize in one DataLoader worker, then a ViT-B/16 forward) against the bare model on ready
tensors, the share of extraction time spent in the forward, and the preprocessing alone (the DataLoader
without the model) with Macenko on and off: preprocessing keeps up when its images/s exceed the model's. Real
CRC-VAL-HE-7K tiles from the shared test data, repeated to `--images`. Each figure is one timed run, not a
median over rounds (the bare model's rate is the mean of one measurement before and one after the pipeline's).
The machine (benchmarks/harness.py) is recorded. Writes benchmarks/results/eval.json and eval.md.
"""

import argparse
import dataclasses
import functools
import tempfile
import time
from collections.abc import Sequence

import datasets
import torch
import torch.nn.functional as F
from harness import RESULTS_DIR, data_path, machine_record, machine_summary, save_results
from torch.utils.data import DataLoader, TensorDataset

from exaonepath_hf import ExaonePathConfig, ExaonePathModel
from exaonepath_hf.eval.common.encoders import Encoder
from exaonepath_hf.eval.common.extraction import ForwardSettings, preprocess_isolating
from exaonepath_hf.eval.common.features import DatasetImages, cache_key, extract_features
from exaonepath_hf.eval.patch.probes import PRESETS, FeatureSplit, fit_linear_probe


def synthetic_features(rows: int, dim: int = 768, classes: int = 9, seed: int = 0) -> FeatureSplit:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, classes, (rows,), generator=generator)
    return FeatureSplit(centres[labels] + 4 * torch.randn(rows, dim, generator=generator), labels)


def dataloader_loop(train: FeatureSplit, iterations: int, classes: int) -> float:
    """The common way: a shuffled DataLoader over a TensorDataset, nn.Linear, SGD; seconds for `iterations`."""
    loader = DataLoader(
        TensorDataset(train.features, train.labels), batch_size=128, shuffle=True, drop_last=True
    )
    linear = torch.nn.Linear(train.features.shape[1], classes)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9)
    started, step = time.perf_counter(), 0
    while step < iterations:
        for features, labels in loader:
            loss = F.cross_entropy(linear(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == iterations:
                break
    return time.perf_counter() - started


def bench_probe(rows_count: int, peer_iterations: int, threads: int) -> list[dict]:
    train, val = synthetic_features(rows_count), synthetic_features(rows_count // 5, seed=1)
    paper = PRESETS["paper"]
    rows = []

    torch.set_num_threads(1)  # as `exaonepath-probe --cpu_threads 1` runs it
    started = time.perf_counter()
    fit = fit_linear_probe(train, val, paper, num_classes=9)
    seconds = time.perf_counter() - started
    torch.set_num_threads(threads)
    rows.append(
        {
            "what": "eval.patch.probes paper protocol (ours, 1 intra-op thread)",
            "iterations": paper.iterations,
            "seconds_for_12500": round(seconds, 2),
            "extrapolated": False,
            "val_top1": round(fit.selected_val_score, 4),
        }
    )

    short = peer_iterations
    seconds = dataloader_loop(train, short, 9) * paper.iterations / short
    rows.append(
        {
            "what": "DataLoader(TensorDataset) loop, same optimizer (peer)",
            "iterations": short,
            "seconds_for_12500": round(seconds, 2),
            "extrapolated": True,
        }
    )

    # our loop with the process's intra-op threads
    config = dataclasses.replace(paper, iterations=short, eval_every=short)
    started = time.perf_counter()
    fit_linear_probe(train, val, config, num_classes=9)
    seconds = (time.perf_counter() - started) * paper.iterations / short
    rows.append(
        {
            "what": f"eval.patch.probes loop with {threads} intra-op threads",
            "iterations": short,
            "seconds_for_12500": round(seconds, 2),
            "extrapolated": True,
        }
    )
    return rows


def crc_tiles(count: int) -> datasets.Dataset:
    paths = sorted(data_path("crc-val-he-7k-samples").glob("*.png"))
    chosen = [str(paths[i % len(paths)]) for i in range(count)]
    return datasets.Dataset.from_dict(
        {"image": chosen, "label": [0] * count, "slide_id": [""] * count, "patient_id": [""] * count}
    ).cast_column("image", datasets.Image(decode=False))


def preprocess_batch(processor, items: list) -> tuple:
    """A loader worker's work on the CPU in `extract_features`: the processor over a batch of decoded images."""
    rows = [row for row, _, _ in items]
    return preprocess_isolating(processor, rows, [image for _, image, _ in items])


def _preprocessing_rates(encoder: Encoder, dataset: datasets.Dataset, batch: int, workers: int) -> list[dict]:
    """images/s of the DataLoader alone (decode and processor in the workers), Macenko on and off."""
    rows = []
    for stain in (True, False):
        preprocessing = encoder.default_preprocessing(stain_normalize=stain)
        loader = DataLoader(
            DatasetImages(dataset, range(len(dataset))),
            batch_size=batch,
            num_workers=workers,
            collate_fn=functools.partial(preprocess_batch, preprocessing.processor()),
        )
        started = time.perf_counter()
        for _ in loader:
            pass
        rate = len(dataset) / (time.perf_counter() - started)
        rows.append(
            {
                "what": f"preprocessing only, Macenko {'on' if stain else 'off'}, {workers} worker(s)",
                "images_per_second": round(rate, 2),
            }
        )
    return rows


def bench_extraction(images: int, batch: int, workers: int) -> list[dict]:
    torch.manual_seed(0)
    model = ExaonePathModel(ExaonePathConfig()).eval()  # ViT-B/16, the released size
    encoder = Encoder(
        model=model,
        source="vit-b16-random",
        revision="bench",
        kind="exaonepath",
        pooling="pooler",
        feature_dim=768,
    )
    dataset = crc_tiles(images)
    pixel_values = torch.randn(batch, 3, 224, 224)
    batches = max(1, images // batch)

    def bare_rate() -> float:  # the same call extract_features makes, on ready tensors
        encoder.features(pixel_values)  # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            encoder.features(pixel_values)
        return batches * batch / (time.perf_counter() - started)

    before = bare_rate()
    rows = _preprocessing_rates(encoder, dataset, batch, workers)
    with tempfile.TemporaryDirectory() as cache:
        preprocessing = encoder.default_preprocessing(stain_normalize=True)
        key = cache_key(encoder, "bench", "bench", "bench", "test", preprocessing, "fp32")
        forward = ForwardSettings(batch_size=batch, num_workers=workers, progress=False)
        result = extract_features(encoder, dataset, preprocessing, key, cache, forward=forward)
    stats = result.stats
    # measured before and after the pipeline runs, averaged: the machine's load drifts
    bare = (before + bare_rate()) / 2
    rows.insert(0, {"what": "bare model forward, ready tensors (peer)", "images_per_second": round(bare, 2)})
    rows.append(
        {
            "what": f"extract_features, Macenko on, {workers} worker(s) (ours)",
            "images_per_second": stats["images_per_second"],
            "model_share_of_wall_time": round(stats["compute_seconds"] / stats["seconds"], 3),
        }
    )
    rows.append(
        {
            "what": "  of which the model forward alone, inside extract_features",
            "images_per_second": round(stats["images_extracted"] / stats["compute_seconds"], 2),
        }
    )
    return rows


def write_markdown(report: dict) -> str:
    lines = [
        f"Measured on {machine_summary(report['machine'])}; {report['threads']} threads.",
        "",
        "| Probe training (100k x 768 cached features, 9 classes) | Seconds for 12,500 iterations |",
        "|---|---|",
    ]
    for row in report["probe"]:
        note = " (extrapolated from " + f"{row['iterations']:,})" if row["extrapolated"] else ""
        lines.append(f"| {row['what']} | {row['seconds_for_12500']:.1f}{note} |")
    if report.get("extraction"):
        lines += ["", f"| Feature extraction, ViT-B/16, batch {report['batch']} | Images/s |", "|---|---|"]
        lines += [f"| {row['what']} | {row['images_per_second']:.1f} |" for row in report["extraction"]]
        share = next(
            r["model_share_of_wall_time"] for r in report["extraction"] if "model_share_of_wall_time" in r
        )
        lines += ["", f"Inside extract_features the model forward takes {share:.0%} of the wall time."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--peer_iterations", "--peer-iterations", dest="peer_iterations", type=int, default=1_250
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip_extraction", "--skip-extraction", dest="skip_extraction", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {
        "machine": machine_record("torch", "transformers", "pillow"),
        "threads": args.threads,
        "batch": args.batch,
        "probe": bench_probe(args.rows, args.peer_iterations, args.threads),
        "extraction": None
        if args.skip_extraction
        else bench_extraction(args.images, args.batch, args.workers),
    }
    table = write_markdown(report)
    save_results(RESULTS_DIR, "eval", report, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
