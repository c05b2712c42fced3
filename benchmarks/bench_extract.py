"""Slide feature extraction throughput: `exaonepath-extract`'s library path with a ViT-B/16, Macenko on and off.

    python benchmarks/bench_extract.py [--copies 2] [--rounds 5] [--num_workers 0] [--quick]

Input: the bundled CC0 slide (CMU-1-Small-Region.svs, 28 tissue patches at the default 256 px / 0.5 µm/px)
copied under `--copies` names and tiled once with `exaonepath-tile`'s defaults (PNG shards), outside the timing.
Model: EXAONEPath's ViT-B/16 built from its config with random weights (the released model's architecture and
cost, no download), saved once with `save_pretrained`; fp32 on the CPU with torch's default intra-op threads.

Each timed call is `eval.slide.features.extract_slide_features` (what `exaonepath-extract TILES --model DIR`
runs) into a fresh output folder, once with Macenko (the default) and once without. Its own report gives the
figures: end to end (`seconds`: loading the model, reading and decoding the shards, the processor, the
forward passes, writing the HDF5 files) and the time in the encoder's forward (`forward_seconds`); the
model-bound share is forward / end to end. Loading the model (`load_encoder`, which also hashes the weights to
identify them) is timed apart once per round, to show how much of the end-to-end time a slide set this small
spends on it. `--num_workers 0` (the default here) reads and preprocesses in the extracting process: on 2
cores DataLoader workers would compete with the forward's threads, and serially every non-model cost shows in
the share. Rounds interleave the settings (alternating which goes first), after one warm-up extraction;
reported: medians over `--rounds` (at least 5) and the range over the rounds. The machine
(benchmarks/harness.py) and the load average are recorded. Writes benchmarks/results/extract.json and extract.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import RESULTS_DIR, add_rounds_argument, machine_record, machine_summary, save_results

from exaonepath_hf import ExaonePathConfig, ExaonePathModel
from exaonepath_hf.demo import sample_slide
from exaonepath_hf.eval.common.encoders import load_encoder
from exaonepath_hf.eval.common.extraction import ForwardSettings
from exaonepath_hf.eval.slide.features import SlideExtractionSettings, extract_slide_features
from exaonepath_hf.tiling import TilingConfig, tile_slides

SETTINGS = {"Macenko on": True, "Macenko off": False}
PACKAGES = ("torch", "transformers", "numpy", "h5py", "pyarrow", "tiffslide", "pillow")


def tile_copies(folder: Path, copies: int) -> tuple[Path, int]:
    """`copies` copies of the bundled slide tiled into `folder/tiles` (exaonepath-tile's defaults); the folder
    and its number of patches."""
    slides = []
    for index in range(copies):
        slides.append(folder / "slides" / f"copy-{index}.svs")
        slides[-1].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_slide(), slides[-1])
    summary = tile_slides(slides, folder / "tiles", TilingConfig(), progress=False)
    if not summary.ok:
        raise RuntimeError(f"tiling the bundled slide failed: {summary.failures}")
    return folder / "tiles", summary.num_patches


def extract(tiles: Path, model: Path, out: Path, stain_normalize: bool, args) -> dict:
    """One timed extraction into a fresh `out`; its report's figures."""
    summary = extract_slide_features(
        SlideExtractionSettings(
            inputs=(tiles,),
            model=str(model),
            output_dir=out,
            stain_normalize=stain_normalize,
            forward=ForwardSettings(batch_size=args.batch_size, num_workers=args.num_workers, progress=False),
        )
    )
    if not summary.ok or summary.skipped:
        raise RuntimeError(f"extraction into {out} did not extract every slide: {summary.to_dict()}")
    shutil.rmtree(out)
    return summary.to_dict()


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def summarize(runs: list[dict], num_patches: int) -> dict:
    """One setting's medians over its rounds, and every round's report."""
    assert all(run["num_patches"] == num_patches for run in runs)
    return {
        "patches_per_second": median_of(runs, "patches_per_second"),
        "seconds": median_of(runs, "seconds"),
        "forward_seconds": median_of(runs, "forward_seconds"),
        "model_bound_share": statistics.median(run["forward_seconds"] / run["seconds"] for run in runs),
        "forward_patches_per_second": statistics.median(
            run["num_patches"] / run["forward_seconds"] for run in runs
        ),
        "by_round": runs,
    }


def markdown(record: dict) -> str:
    """The results table of a run's record (what extract.md holds)."""
    workers = f"{record['num_workers']} loader worker{'s' if record['num_workers'] != 1 else ''}"
    lines = [
        f"{machine_summary(record['machine'])}. 1-min load average "
        f"{record['load_average_at_start'][0]:.1f} at the start, {record['load_average_at_end'][0]:.1f} at the "
        f"end; median of {record['rounds']} interleaved rounds (range over the rounds in brackets); "
        f"{record['date']}.",
        "",
        f"| `exaonepath-extract` ({record['model']}, fp32, {record['threads']} threads, batch "
        f"{record['batch_size']}, {workers}; {record['patches']} patches of {record['copies']} slides) "
        "| patches/s end to end | s end to end | s in the forward | model-bound share |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, result in record["results"].items():
        rounds = result["by_round"]
        speeds = [run["patches_per_second"] for run in rounds]
        shares = [run["forward_seconds"] / run["seconds"] for run in rounds]
        lines.append(
            f"| {name} | {result['patches_per_second']:.2f} ({min(speeds):.2f}-{max(speeds):.2f}) | "
            f"{result['seconds']:.1f} | {result['forward_seconds']:.1f} | "
            f"{result['model_bound_share']:.0%} ({min(shares):.0%}-{max(shares):.0%}) |"
        )
    lines += [
        "",
        "Loading the model (`load_encoder`, weights hashed), timed apart: "
        f"{record['load_encoder_seconds']:.1f} s (median), once per run, not per patch.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2, help="copies of the bundled slide (28 patches each)")
    add_rounds_argument(parser)
    parser.add_argument("--batch_size", type=int, default=ForwardSettings.batch_size)
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers of the extraction")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run with a 2-block 64-d ViT: printed, not saved"
    )
    args = parser.parse_args()

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_at_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as scratch:
        scratch = Path(scratch)
        tiles, num_patches = tile_copies(scratch / "set", args.copies)
        warmup_tiles, _ = tile_copies(scratch / "warmup", 1)
        torch.manual_seed(0)
        config = (
            ExaonePathConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
            if args.quick
            else ExaonePathConfig()
        )
        model = scratch / "model"
        ExaonePathModel(config).save_pretrained(model)

        extract(warmup_tiles, model, scratch / "warmup-features", True, args)
        runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        load_seconds = []
        for round_index in range(args.rounds):
            order = list(SETTINGS) if round_index % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                out = scratch / f"features-{round_index}-{name.replace(' ', '-')}"
                runs[name].append(extract(tiles, model, out, SETTINGS[name], args))
            loading = time.perf_counter()
            load_encoder(model)
            load_seconds.append(time.perf_counter() - loading)
            print(f"round {round_index + 1}/{args.rounds}: {time.perf_counter() - started:.0f} s", flush=True)

    results = {name: summarize(values, num_patches) for name, values in runs.items()}
    record = {
        "what": "eval.slide.features.extract_slide_features on an exaonepath-tile folder (PNG shards)",
        "model": "EXAONEPath ViT-B/16, random weights" if not args.quick else "2-block 64-d ViT (quick)",
        "model_config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "patch_size")},
        "slide": sample_slide().name,
        "copies": args.copies,
        "patches": num_patches,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "threads": torch.get_num_threads(),
        "precision": "fp32",
        "rounds": args.rounds,
        "statistic": "median over interleaved rounds (one warm-up extraction first); model-bound share = "
        "forward_seconds / seconds of each run",
        "results": results,
        "load_encoder_seconds": statistics.median(load_seconds),
        "load_encoder_seconds_by_round": load_seconds,
        "machine": machine_record(*PACKAGES),
        "date": started_at,
        "load_average_at_start": list(load_at_start),
        "load_average_at_end": list(os.getloadavg()),
        "total_seconds": time.perf_counter() - started,
        "quick": args.quick,
    }

    table = markdown(record)
    if not args.quick:
        save_results(RESULTS_DIR, "extract", record, table)
    print(table)


if __name__ == "__main__":
    main()
