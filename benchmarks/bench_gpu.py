"""GPU throughput of every stage, side by side in one run on one GPU: Macenko, the processor, the backbone,
`exaonepath-extract` from tiler shards to h5, and DINO pretraining.

    python benchmarks/bench_gpu.py --tiles TILES          # on a GPU machine (writes results/gpu.json, gpu.md)
    python benchmarks/bench_gpu.py --dry_run --out DIR    # anywhere: tiny sizes on the CPU; says it is a dry run

TILES is `exaonepath-tile` output of the bundled slide at 0.25 µm/px (`exaonepath-tile
exaonepath_hf/data/CMU-1-Small-Region.svs --out TILES --target_mpp 0.25 --resize --format jpeg`); without
`--tiles` the script tiles it itself (which needs a slide reader). For extraction the script repeats that slide
as many times as give at least `--extract_patches` patches: each copy is a slide record of its own over the
same shards, so the run streams many slides as a user's would.

Stages, each configuration measured in interleaved rounds (median reported):
- Macenko on 224² real uint8 patches already on the GPU: ours with default settings (chunks sized by memory),
  ours with the CPU's cache-sized chunks of 8 images, torchstain's torch normalizer (the release's algorithm)
  per patch on the GPU; and the equality of our outputs across chunk sizes and against the CPU.
- The processor to `pixel_values` on the GPU from real 256² patches: a list of uint8 CPU tensors, a list of PIL
  images, one uint8 batch already on the GPU; and its equality with the CPU processor.
- The backbone (ViT-B/16, bf16, SDPA): ours, timm's `vit_base_patch16_224`, ours under `torch.compile`.
- `exaonepath-extract` (the console script, in a child process, as a user runs it): `--help`, then whole runs
  with the processor on the GPU (the default) and in the loader workers; steady-state patches/s after the first
  batch, start-up to the first batch, the loader-wait share.
- DINO with the `one_gpu` recipe on real patches: images/s and the data-wait share.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_model import build_models, features
from bench_stain import load_target, real_patches, torchstain_torch
from harness import (
    DATA_DIR,
    REPOSITORY,
    RESULTS_DIR,
    add_rounds_argument,
    machine_record,
    machine_summary,
    save_results,
)
from PIL import Image

from exaonepath_hf import ExaonePathConfig, ExaonePathImageProcessor, ExaonePathModel
from exaonepath_hf.atomic_io import write_json
from exaonepath_hf.stain_normalization import MacenkoNormalizer
from exaonepath_hf.tiling import TilingConfig, TilingManifest, read_manifest, tile_slides

SAMPLE_SLIDE = REPOSITORY / "exaonepath_hf" / "data" / "CMU-1-Small-Region.svs"
PACKAGES = ("torch", "torchvision", "transformers", "numpy", "exaonepath-hf")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each stage processes: the GPU run's sizes, or a dry run's."""

    macenko: int = 1024
    torchstain: int = 128
    processor: int = 1024
    model_batch: int = 512
    model_batches: int = 4
    extract_patches: int = 10_000
    extract_batch: int = 512
    dino_steps: int = 200
    dino_reference_steps: int = 60


DRY_SIZES = Sizes(
    macenko=8, torchstain=2, processor=8, model_batch=2, model_batches=1, extract_patches=8, extract_batch=4,
    dino_steps=2, dino_reference_steps=2,
)  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(configurations: dict[str, Callable[[], object]], rounds: int, device) -> dict[str, float]:
    """Median seconds of each configuration over `rounds` rounds, one run of each per round in turn, after one
    warm-up run each."""
    for run in configurations.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in configurations}
    for _ in range(rounds):
        for name, run in configurations.items():
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def gpu_driver() -> str | None:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------------------------------------------- stages


def bench_macenko(device: torch.device, sizes: Sizes, rounds: int) -> dict:
    patches = _repeated(real_patches(DATA_DIR, count=min(sizes.macenko, 256), size=224), sizes.macenko)
    target = load_target(DATA_DIR)
    batch = torch.stack(patches).to(device)
    default, cache_sized = MacenkoNormalizer(), MacenkoNormalizer(max_batch_pixels=8 * 224 * 224)
    default.fit(target)
    cache_sized.reference = default.reference
    peer, peer_patches = (
        torchstain_torch(target.to(device)),
        [p.to(device) for p in patches[: sizes.torchstain]],
    )
    seconds = interleaved(
        {
            "ours, default chunks": lambda: default.normalize(batch),
            "ours, 8-image chunks (the CPU's)": lambda: cache_sized.normalize(batch),
            "torchstain torch, per patch": lambda: peer(peer_patches),
        },
        rounds,
        device,
    )
    counts = {"ours, default chunks": len(patches), "ours, 8-image chunks (the CPU's)": len(patches)}
    rates = {name: counts.get(name, len(peer_patches)) / value for name, value in seconds.items()}
    whole, chunked = default.normalize(batch), cache_sized.normalize(batch)
    on_cpu = MacenkoNormalizer(reference=default.reference).normalize(batch[:64].cpu())
    return {
        "patches": len(patches),
        "patch_size": 224,
        "patches_per_second": rates,
        "vs_torchstain": rates["ours, default chunks"] / rates["torchstain torch, per patch"],
        "max_abs_default_vs_8_image_chunks": float((whole.images - chunked.images).abs().max()),
        "flags_equal_default_vs_8_image_chunks": bool(torch.equal(whole.normalized, chunked.normalized)),
        "max_abs_device_vs_cpu": float((whole.images[:64].cpu() - on_cpu.images).abs().max()),
        "flags_equal_device_vs_cpu": bool(torch.equal(whole.normalized[:64].cpu(), on_cpu.normalized)),
    }


def bench_processor(device: torch.device, sizes: Sizes, rounds: int) -> dict:
    patches = _repeated(real_patches(DATA_DIR, count=min(sizes.processor, 144), size=256), sizes.processor)
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in patches]
    stacked = torch.stack(patches).to(device)
    processor = ExaonePathImageProcessor()
    seconds = interleaved(
        {
            "list of uint8 CPU tensors": lambda: processor(patches, return_tensors="pt", device=device),
            "list of PIL images": lambda: processor(pil, return_tensors="pt", device=device),
            "one uint8 batch on the device": lambda: processor(stacked, return_tensors="pt"),
        },
        rounds,
        device,
    )
    on_device = processor(patches[:64], return_tensors="pt", device=device)
    on_cpu = processor(patches[:64], return_tensors="pt")
    return {
        "patches": len(patches),
        "patch_size": 256,
        "patches_per_second": {name: len(patches) / value for name, value in seconds.items()},
        "max_abs_device_vs_cpu": float(
            (on_device["pixel_values"].cpu() - on_cpu["pixel_values"]).abs().max()
        ),
        "flags_equal_device_vs_cpu": bool(
            torch.equal(on_device["stain_normalized"].cpu(), on_cpu["stain_normalized"])
        ),
    }


def bench_model(device: torch.device, sizes: Sizes, rounds: int, compile_model: bool, dry_run: bool) -> dict:
    tiny = {"timm_name": "vit_tiny_patch16_224", "hidden_size": 192, "num_attention_heads": 3}
    built = build_models(**tiny) if dry_run else build_models()
    models = {name: model.to(device) for name, model in built.items() if "eager" not in name}
    if compile_model:
        ours_name = next(name for name in models if name.startswith("exaonepath"))
        models[f"{ours_name}, torch.compile"] = torch.compile(models[ours_name], dynamic=False)
    pixel_values = torch.randn(sizes.model_batch, 3, 224, 224, device=device)
    bf16 = device.type == "cuda"

    def forward(model):
        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                for _ in range(sizes.model_batches):
                    features(model, pixel_values)

        return run

    seconds = interleaved({name: forward(model) for name, model in models.items()}, rounds, device)
    images = sizes.model_batch * sizes.model_batches
    rates = {name: images / value for name, value in seconds.items()}
    timm_rate = next(rate for name, rate in rates.items() if name.startswith("timm"))
    return {
        "architecture": "ViT-Ti/16" if dry_run else "ViT-B/16",
        "batch": sizes.model_batch,
        "precision": "bf16" if bf16 else "fp32",
        "images_per_second": rates,
        "relative_to_timm": {name: rate / timm_rate for name, rate in rates.items()},
    }


def extraction_input(tiles: Path, out: Path, min_patches: int) -> tuple[Path, int, int]:
    """`tiles` (one slide's tiler output) as a folder of copies of that slide with at least `min_patches`
    patches in all: each copy a slide record of its own over the same shards and coordinates, in a manifest
    the tiling package writes (`TilingManifest`). Returns (folder, slides, patches)."""
    manifest = read_manifest(tiles)
    (slide_id, record), *others = manifest.slides.items()
    if others:
        raise SystemExit(f"{tiles}: expected the tiler output of one slide, found {len(others) + 1}")
    copies = max(1, math.ceil(min_patches / record.num_patches))
    folder = out / "tiles"
    for name in ("shards", "coords", "thumbnails"):
        shutil.copytree(tiles / name, folder / name)
    slides = {
        f"{slide_id}-{copy:03d}": dataclasses.replace(record, slide_id=f"{slide_id}-{copy:03d}")
        for copy in range(copies)
    }
    write_json(folder / "manifest.json", TilingManifest(manifest.config, slides, []).to_dict())
    return folder, copies, copies * record.num_patches


def run_command(name: str, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    """A console script of the package run as its entry point in a child Python: (wall seconds, result)."""
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name=name)
    code = f"import sys; from {entry.module} import {entry.attr} as main; sys.exit(main())"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"{name} {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return seconds, result


def bench_extract(tiles: Path, model_dir: Path, work: Path, sizes: Sizes, rounds: int, workers: int) -> dict:
    folder, slides, patches = extraction_input(tiles, work, sizes.extract_patches)
    help_seconds = statistics.median(run_command("exaonepath-extract", "--help")[0] for _ in range(rounds))
    modes = {"processor on the GPU": "device", "processor in the loader workers": "workers"}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    for round_index in range(rounds):
        for name, preprocess_on in modes.items():
            out = work / f"features-{preprocess_on}-{round_index}"
            args = [str(folder), "--model", str(model_dir), "--output_dir", str(out), "--quiet"]
            args += ["--batch_size", str(sizes.extract_batch), "--num_workers", str(workers)]
            wall, _ = run_command("exaonepath-extract", *args, "--preprocess_on", preprocess_on)
            report = _read_json(out / "extraction_report.json")
            if report["failures"] or len(report["extracted"]) != slides:
                raise RuntimeError(
                    f"extraction into {out} did not extract every slide: {report['failures'][:3]}"
                )
            runs[name].append({"wall_seconds": wall, **report})
            shutil.rmtree(out)
    return {
        "slides": slides,
        "patches": patches,
        "batch_size": sizes.extract_batch,
        "num_workers": workers,
        "help_seconds": help_seconds,
        "runs": {
            name: {
                key: statistics.median(run[key] for run in values)
                for key in ("wall_seconds", "seconds", "startup_seconds", "steady_patches_per_second")
            }
            | {"wait_share": statistics.median(run["wait_seconds"] / run["seconds"] for run in values)}
            for name, values in runs.items()
        },
    }


def bench_dino(tiles: Path, sizes: Sizes, dry_run: bool, workers: int) -> dict:
    """DINO steps of the `one_gpu` recipe on the tiler's real patches: the loader augmenting on the CPU (the
    default), and Macenko plus the crops on the GPU under torch.compile. One run of each (its own mean over
    `dino_steps` steps after warm-up); the second also profiles a few steps."""
    from exaonepath_hf.train.dino.throughput import measure_dino_throughput

    common = {
        "config": "cpu_smoke" if dry_run else "one_gpu",
        "source": str(tiles),
        "steps": sizes.dino_steps,
        "warmup_steps": 1 if dry_run else 10,
        "overrides": [f"data.num_workers={workers}"],
    }
    runs = {
        "loader augments on the CPU": measure_dino_throughput(
            **{**common, "steps": sizes.dino_reference_steps}, augment_on="cpu", compile=False
        ),
        "augments on the GPU" + ("" if dry_run else ", torch.compile"): measure_dino_throughput(
            **common, augment_on="gpu", compile=not dry_run, profile_steps=0 if dry_run else 3
        ),
    }
    return {"config": common["config"], "runs": runs}


# ------------------------------------------------------------------------------------------------------ main


def _repeated(items: list, count: int) -> list:
    return [items[index % len(items)] for index in range(count)]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def save_model(folder: Path, dry_run: bool) -> Path:
    """A randomly initialised EXAONEPath model with its processor (ViT-B/16; a tiny ViT in a dry run)."""
    torch.manual_seed(0)
    config = ExaonePathConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2) if dry_run else None
    ExaonePathModel(config or ExaonePathConfig()).save_pretrained(folder)
    ExaonePathImageProcessor().save_pretrained(folder)
    return folder


def sample_tiles(work: Path) -> Path:
    tiles = work / "sample-tiles"
    config = TilingConfig(target_mpp=0.25, resize_to_target=True, image_format="jpeg")
    summary = tile_slides([SAMPLE_SLIDE], tiles, config, progress=False)
    if not summary.ok:
        raise SystemExit(f"tiling the bundled slide failed: {summary.failures}")
    return tiles


def _rows(record: dict) -> list[str]:
    rows = []
    if "macenko" in record:
        macenko = record["macenko"]
        where = f"Macenko, {macenko['patches']} × 224² on the device"
        rows += [
            f"| {where} | {name} | {rate:,.0f} patches/s |"
            for name, rate in macenko["patches_per_second"].items()
        ]
    if "processor" in record:
        processor = record["processor"]
        where = f"processor → pixel_values, {processor['patches']} × 256²"
        rows += [
            f"| {where} | {name} | {rate:,.0f} patches/s |"
            for name, rate in processor["patches_per_second"].items()
        ]
    if "model" in record:
        model = record["model"]
        where = f"backbone {model['architecture']} {model['precision']}, batch {model['batch']}"
        rows += [
            f"| {where} | {name} | {rate:,.0f} images/s |"
            for name, rate in model["images_per_second"].items()
        ]
    if "extract" in record:
        extract = record["extract"]
        where = (
            f"exaonepath-extract, {extract['patches']:,} patches in {extract['slides']} slides, batch "
            f"{extract['batch_size']}, {extract['num_workers']} workers"
        )
        rows += [
            f"| {where} | {name}: steady state (start-up {run['startup_seconds']:.1f} s, loader wait "
            f"{run['wait_share']:.0%}, wall {run['wall_seconds']:.1f} s) | {run['steady_patches_per_second']:,.0f} "
            "patches/s |"
            for name, run in extract["runs"].items()
        ]
        rows.append(f"| exaonepath-extract --help | wall time | {extract['help_seconds']:.2f} s |")
    if "dino" in record:
        rows += [
            f"| DINO `{record['dino']['config']}`, batch {run['batch_size']}, {run['steps']} steps, "
            f"{run['num_workers']} workers | {name} (data wait {run['data_wait_fraction']:.1%}) | "
            f"{run['images_per_s']:,.0f} images/s |"
            for name, run in record["dino"]["runs"].items()
        ]
    return rows


def _equalities(record: dict) -> list[str]:
    notes = []
    if "macenko" in record:
        macenko = record["macenko"]
        notes.append(
            f"Macenko: ours/torchstain {macenko['vs_torchstain']:.0f}×; default vs 8-image chunks max |Δ| "
            f"{macenko['max_abs_default_vs_8_image_chunks']:.1e} (flags equal: "
            f"{macenko['flags_equal_default_vs_8_image_chunks']}); device vs CPU max |Δ| "
            f"{macenko['max_abs_device_vs_cpu']:.1e} (flags equal: {macenko['flags_equal_device_vs_cpu']})."
        )
    if "processor" in record:
        processor = record["processor"]
        notes.append(
            f"Processor: device vs CPU max |Δ| {processor['max_abs_device_vs_cpu']:.1e} (flags equal: "
            f"{processor['flags_equal_device_vs_cpu']})."
        )
    return notes


def markdown(record: dict) -> str:
    """The results table of a run's record (what gpu.md holds)."""
    lines = [
        f"{'DRY RUN on the CPU (tiny sizes: no figure here means anything). ' if record['dry_run'] else ''}"
        f"{machine_summary(record['machine'])}; driver {record['driver']}; median of {record['rounds']} "
        "interleaved rounds.",
        "",
        "| stage | configuration | rate |",
        "|---|---|---:|",
        *_rows(record),
        "",
        *_equalities(record),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiles", type=Path, default=None, help="tiler output of the bundled slide (see above)"
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="tiny sizes on the CPU: checks the script runs"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where gpu.json and gpu.md go")
    parser.add_argument(
        "--extract_workers", type=int, default=None, help="loader workers (default: CPUs - 1)"
    )
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=("macenko", "processor", "model", "extract", "dino")
    )
    add_rounds_argument(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print("bench_gpu: no CUDA GPU here; run with --dry_run to check the script", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(1)  # a dry run checks the script; one thread keeps it quick on a busy machine
    sizes = DRY_SIZES if args.dry_run else Sizes()
    workers = (
        args.extract_workers if args.extract_workers is not None else max(1, min(15, (_cpus() or 2) - 1))
    )
    record: dict = {
        "dry_run": args.dry_run,
        "machine": machine_record(*PACKAGES, gpu=not args.dry_run),
        "driver": gpu_driver(),
        "rounds": args.rounds,
        "sizes": dataclasses.asdict(sizes),
    }
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as temporary:
        work = Path(temporary)

        def tiles() -> Path:
            return args.tiles or (
                work / "sample-tiles" if (work / "sample-tiles").is_dir() else sample_tiles(work)
            )

        stages = {
            "macenko": lambda: bench_macenko(device, sizes, args.rounds),
            "processor": lambda: bench_processor(device, sizes, args.rounds),
            "model": lambda: bench_model(
                device, sizes, args.rounds, not args.no_compile and not args.dry_run, args.dry_run
            ),
            "extract": lambda: bench_extract(
                tiles(), save_model(work / "model", args.dry_run), work, sizes, 1 if args.dry_run else args.rounds, workers
            ),
            "dino": lambda: bench_dino(tiles(), sizes, args.dry_run, workers),
        }  # fmt: skip
        for name, stage in stages.items():
            if name in args.skip:
                continue
            started = time.perf_counter()
            record[name] = stage()
            print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            save_results(args.out, "gpu", record, markdown(record))  # a run cut short keeps its stages
    print(markdown(record))
    return 0


def _cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    raise SystemExit(main())
