"""Macenko stain normalization and end-to-end preprocessing throughput against the peers, in one run.

    python benchmarks/bench_stain.py [--threads 2] [--count 256] [--mixed 48] [--rounds 5]

The same `--count` real H&E patches of 224x224 (cut from the images of the shared test data, round-robin over the
source images so that every stain, tissue type and the background crops are represented) go through:

1. Macenko only (patches/s): ours (one batched call), torchstain's torch normalizer (the release's algorithm,
   one patch at a time, exceptions caught like the release), and where installed stainx, torch-staintools,
   macenko-pca (normalization composed from its stain separation) and staintools. Every method is fitted to
   the same target image first. Peers are a `bench` extra, not runtime dependencies; a peer that is missing
   or fails is recorded with the reason.
2. End to end from PIL images to `pixel_values`: `ExaonePathImageProcessor` against the release pipeline
   (torchstain normalizer, then torchvision Resize(256, bicubic) / CenterCrop(224) / Normalize per image), on
   those patches and on `--mixed` real tiles of mixed sizes, 224 to 1024 px (`mixed_size_tiles`).

Both run twice: in this process with numpy's default CPU dispatch, and in a child process started with
`NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"` (numpy's AVX2 kernels; its AVX-512 `partition` is
several times slower on AMD Zen 4 than on other hosts). The child runs ours and the release's only.

Peers: `pip install -e ".[bench]"` (torchstain, macenko-pca), then, as their pins would replace torch:
`pip install --no-build-isolation --no-deps stainx==0.1.6`,
`pip install --no-deps torch-staintools==1.0.7 kornia==0.8.2 kornia-rs staintools==2.1.2 spams-bin
opencv-python-headless`.

Each method runs `--rounds` (at least 5) timed passes (after a warm-up on 8 images; the median is reported;
the passes of the methods are interleaved) with `torch.set_num_threads(--threads)`. The machine
(benchmarks/harness.py), numpy's dispatch targets (baseline, compiled, active) and the load average are
recorded with the figures. Writes benchmarks/results/stain.json and stain.md.
`real_patches()` is also the patch set of the parity tests, `mixed_size_tiles()` that of the processor's
mixed-size test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from harness import DATA_DIR, RESULTS_DIR, add_rounds_argument, machine_record, machine_summary, save_results
from PIL import Image

PATCH = 224
# source folders of the patch set, in order; within a folder files are sorted by name
PATCH_SOURCES = (
    "crc-val-he-7k-samples",
    "macenko-reference",
    "stain-templates",
    "he-images",
    "tcga-tiles",
    "tiles",
)
TARGET = "he-images/tiatoolbox_target_image.png"
WARMUP = 8


def _source_images(data_dir: Path) -> list[Path]:
    files = []
    for folder in PATCH_SOURCES:
        for path in sorted((data_dir / folder).rglob("*")):
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif") and not path.stem.startswith("norm"):
                files.append(path)
    return files


def real_patches(data_dir: Path = DATA_DIR, count: int = 256, size: int = PATCH) -> list[torch.Tensor]:
    """`count` real uint8 3×size×size patches: the non-overlapping grid crops of every source image, taken
    round-robin over the images (one crop of each image, then the second of each, ...)."""
    grids = []
    for path in _source_images(data_dir):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        height, width, _ = pixels.shape
        crops = [
            torch.from_numpy(pixels[top : top + size, left : left + size].copy())
            .permute(2, 0, 1)
            .contiguous()
            for top in range(0, height - size + 1, size)
            for left in range(0, width - size + 1, size)
        ]
        if crops:
            grids.append(crops)
    patches = []
    depth = 0
    while len(patches) < count and any(depth < len(crops) for crops in grids):
        patches.extend(crops[depth] for crops in grids if depth < len(crops))
        depth += 1
    if len(patches) < count:
        raise RuntimeError(f"only {len(patches)} {size}x{size} patches in {data_dir}; asked for {count}")
    return patches[:count]


def load_target(data_dir: Path = DATA_DIR) -> torch.Tensor:
    with Image.open(data_dir / TARGET) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


MIXED_SIZES = (224, 256, 320, 384, 448, 512, 768, 1024)


def mixed_size_tiles(data_dir: Path = DATA_DIR, count: int = 48) -> list[torch.Tensor]:
    """`count` real uint8 3×s×s tiles with s cycling through MIXED_SIZES (224 to 1024, as tiles cut at different
    magnifications come): the i-th is cut from the next source image (round-robin) that is at least s×s, at an
    offset drawn from `random.Random(i)`, so the set is the same on every run."""
    import random

    pixels = []
    for path in _source_images(data_dir):
        with Image.open(path) as image:
            pixels.append(np.asarray(image.convert("RGB")))
    tiles, cursor = [], 0
    for index in range(count):
        size = MIXED_SIZES[index % len(MIXED_SIZES)]
        large = [array for array in pixels if min(array.shape[:2]) >= size]
        if not large:
            raise RuntimeError(f"no image of at least {size}x{size} in {data_dir}")
        array = large[cursor % len(large)]
        cursor += 1
        chooser = random.Random(index)
        top = chooser.randrange(array.shape[0] - size + 1)
        left = chooser.randrange(array.shape[1] - size + 1)
        crop = array[top : top + size, left : left + size]
        tiles.append(torch.from_numpy(crop.copy()).permute(2, 0, 1).contiguous())
    return tiles


# --------------------------------------------------------------------------------------------- Macenko methods
def ours(target: torch.Tensor) -> Callable:
    from exaonepath_hf.stain_normalization import MacenkoNormalizer

    normalizer = MacenkoNormalizer()
    normalizer.fit(target)
    return lambda patches: normalizer.normalize(patches).images  # the list, as every peer gets it


def torchstain_torch(target: torch.Tensor) -> Callable:
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    normalizer = TorchMacenkoNormalizer()
    normalizer.fit(target)

    def run(patches):
        outputs = []
        for patch in patches:
            try:  # the release returns the input when torchstain raises (background patches)
                outputs.append(normalizer.normalize(patch, stains=False)[0])
            except Exception:
                outputs.append(patch)
        return outputs

    return run


def stainx_macenko(target: torch.Tensor) -> Callable:
    import stainx

    normalizer = stainx.Macenko(device="cpu")
    normalizer.fit(target.unsqueeze(0))
    return lambda patches: normalizer.transform(torch.stack(patches))


def torch_staintools_macenko(target: torch.Tensor) -> Callable:
    from torch_staintools.normalizer import NormalizerBuilder

    # least squares concentrations and 1% angles like the release (its other defaults differ: Lab mask, Io)
    normalizer = NormalizerBuilder.build("macenko", concentration_solver="ls", perc=1)
    normalizer.fit(target.unsqueeze(0).float() / 255)
    return lambda patches: normalizer(torch.stack(patches).float() / 255)


def macenko_pca_composed(target: torch.Tensor) -> Callable:
    import macenko_pca

    def stains_and_maxima(image: np.ndarray):
        matrix = macenko_pca.rgb_separate_stains_macenko_pca(image)
        concentrations = macenko_pca.rgb_color_deconvolution(image, matrix)
        return matrix, concentrations, np.percentile(concentrations[..., :2].reshape(-1, 2), 99, axis=0)

    target_matrix, _, target_maxima = stains_and_maxima(target.permute(1, 2, 0).numpy().astype(np.float32))

    def run(patches):
        outputs = []
        for patch in patches:
            image = patch.permute(1, 2, 0).numpy().astype(np.float32)
            try:
                _, concentrations, maxima = stains_and_maxima(image)
                concentrations[..., :2] *= target_maxima / maxima
                outputs.append(macenko_pca.reconstruct_rgb(concentrations, target_matrix))
            except BaseException as error:  # its Rust panics are BaseExceptions
                if isinstance(error, (KeyboardInterrupt, SystemExit)):
                    raise
                outputs.append(image)
        return outputs

    return run


def staintools_macenko(target: torch.Tensor) -> Callable:
    import staintools

    normalizer = staintools.StainNormalizer(method="macenko")
    normalizer.fit(np.ascontiguousarray(target.permute(1, 2, 0).numpy()))

    def run(patches):
        outputs = []
        for patch in patches:
            try:
                outputs.append(normalizer.transform(np.ascontiguousarray(patch.permute(1, 2, 0).numpy())))
            except Exception:
                outputs.append(patch)
        return outputs

    return run


MACENKO_METHODS = {
    "exaonepath_hf MacenkoNormalizer (batched)": (ours, "exaonepath_hf"),
    "torchstain 1.4 torch (the release's algorithm)": (torchstain_torch, "torchstain"),
    "stainx Macenko (torch backend)": (stainx_macenko, "stainx"),
    "torch-staintools Macenko (ls)": (torch_staintools_macenko, "torch_staintools"),
    "macenko-pca (separation + composed normalize)": (macenko_pca_composed, "macenko_pca"),
    "staintools Macenko": (staintools_macenko, "staintools"),
}


# -------------------------------------------------------------------------------------------- end to end
def processor_pipeline(target: torch.Tensor) -> Callable:
    from exaonepath_hf.image_processing_exaonepath import ExaonePathImageProcessor

    processor = ExaonePathImageProcessor()
    processor.fit_stain_reference(target)
    return lambda images: processor(images, return_tensors="pt")["pixel_values"]


def release_pipeline(target: torch.Tensor) -> Callable:
    import torchvision.transforms as T
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    normalizer = TorchMacenkoNormalizer()
    normalizer.fit(target)
    to_0_255 = T.Compose([T.ToTensor(), T.Lambda(lambda image: image * 255)])
    after = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )

    def run(images):
        outputs = []
        for image in images:
            try:
                normalized = normalizer.normalize(to_0_255(image), stains=False)[0].permute(2, 0, 1) / 255.0
            except Exception:
                normalized = T.functional.to_tensor(image)
            outputs.append(after(normalized))
        return torch.stack(outputs)

    return run


END_TO_END_METHODS = {
    "ExaonePathImageProcessor (PIL -> pixel_values)": processor_pipeline,
    "release pipeline (torchstain + torchvision per PIL image)": release_pipeline,
}


def time_methods(builds: dict[str, Callable], target: torch.Tensor, inputs: list, rounds: int) -> dict:
    """Median of `rounds` timed passes per method (one pass is ~0.2 s for the fast methods, too short to trust
    alone). The passes are interleaved, one per method in turn, so that a change in the machine's speed during
    the run (other tenants, thermal state) weighs on every method alike. A method that fails is skipped."""
    results, runs = {}, {}
    for name, build in builds.items():
        try:
            runs[name] = build(target)
            runs[name](inputs[:WARMUP])
        except Exception as error:
            results[name] = {"skipped": f"failed: {error!r}"}
    passes: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in list(runs.items()):
            start = time.perf_counter()
            try:
                run(inputs)
            except Exception as error:
                results[name] = {"skipped": f"failed: {error!r}"}
                del runs[name]
                continue
            passes[name].append(time.perf_counter() - start)
    for name in runs:
        seconds = statistics.median(passes[name])
        results[name] = {
            "seconds": round(seconds, 4),
            "seconds_per_pass": [round(value, 4) for value in passes[name]],
            "patches_per_s": round(len(inputs) / seconds, 1),
        }
        print(name, results[name], file=sys.stderr)
    return {name: results[name] for name in builds}


#: numpy's AVX-512 dispatch targets: disabling them (before numpy is imported) runs its AVX2 kernels instead
AVX2_PATH = "X86_V4 AVX512_ICL AVX512_SPR"
TORCHSTAIN = "torchstain 1.4 torch (the release's algorithm)"
OURS = "exaonepath_hf MacenkoNormalizer (batched)"
PROCESSOR = "ExaonePathImageProcessor (PIL -> pixel_values)"
RELEASE = "release pipeline (torchstain + torchvision per PIL image)"


def numpy_dispatch() -> dict:
    """numpy's version, baseline and the dispatch targets it may use and does use here (the kernels of
    `partition`, `sort`, ... differ by target, and their speed by CPU)."""
    from numpy._core import _multiarray_umath as umath

    features = umath.__cpu_features__
    return {
        "version": np.__version__,
        "baseline": list(umath.__cpu_baseline__),
        "dispatch": list(umath.__cpu_dispatch__),
        "dispatch_active": [target for target in umath.__cpu_dispatch__ if features.get(target)],
        "NPY_DISABLE_CPU_FEATURES": os.environ.get("NPY_DISABLE_CPU_FEATURES", ""),
    }


def _with_speedups(entries: dict, reference: str, key: str) -> dict:
    base = entries.get(reference, {}).get("patches_per_s")
    for entry in entries.values():
        if "patches_per_s" in entry and base:
            entry[key] = round(entry["patches_per_s"] / base, 2)
    return entries


def measure(threads: int, count: int, rounds: int, mixed_count: int, peers: bool) -> dict:
    """Macenko on the equal-size patches, and end to end on them and on the mixed-size tiles, in this process
    (with the numpy dispatch it was started with). Without `peers` only ours and torchstain run for Macenko."""
    torch.set_num_threads(threads)
    patches = real_patches(DATA_DIR, count)
    tiles = mixed_size_tiles(DATA_DIR, mixed_count)
    target = load_target(DATA_DIR)
    macenko: dict = {}
    builds = {}
    for name, (build, module) in MACENKO_METHODS.items():
        if not peers and name not in (OURS, TORCHSTAIN):
            continue
        try:
            __import__(module)
        except Exception as error:
            macenko[name] = {"skipped": f"not installable/importable here: {error!r}"}
            continue
        builds[name] = build
    macenko.update(time_methods(builds, target, patches, rounds))
    macenko = {name: macenko[name] for name in MACENKO_METHODS if name in macenko}
    to_pil = lambda images: [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]  # noqa: E731
    return {
        "numpy": numpy_dispatch(),
        "macenko": _with_speedups(macenko, TORCHSTAIN, "speedup_vs_torchstain"),
        "end_to_end": _with_speedups(
            time_methods(END_TO_END_METHODS, target, to_pil(patches), rounds), RELEASE, "speedup_vs_release"
        ),
        "end_to_end_mixed": _with_speedups(
            time_methods(END_TO_END_METHODS, target, to_pil(tiles), rounds), RELEASE, "speedup_vs_release"
        ),
    }


def measure_in_child(args: argparse.Namespace, disabled: str) -> dict:
    """`measure` in a fresh Python with NPY_DISABLE_CPU_FEATURES set (numpy reads it once, on import)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "child.json"
        command = [sys.executable, __file__, "--child", str(output), "--threads", str(args.threads)]
        command += ["--count", str(args.count), "--rounds", str(args.rounds), "--mixed", str(args.mixed)]
        subprocess.run(command, check=True, env={**os.environ, "NPY_DISABLE_CPU_FEATURES": disabled})
        return json.loads(output.read_text(encoding="utf-8"))


def run_benchmark(args: argparse.Namespace) -> dict:
    sizes = ", ".join(str(size) for size in MIXED_SIZES)
    results: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()),
        "machine": machine_record("torch", "numpy"),
        "threads": args.threads,
        "rounds": args.rounds,
        "statistic": "median of the rounds' timed passes",
        "patches": f"{args.count} real {PATCH}x{PATCH} H&E patches from {', '.join(PATCH_SOURCES)}",
        "mixed_tiles": f"{args.mixed} real square H&E tiles of {sizes} px cut from the same images",
        "target": TARGET,
        "dispatch_paths": {"default": measure(args.threads, args.count, args.rounds, args.mixed, peers=True)},
    }
    results["dispatch_paths"]["avx2"] = measure_in_child(args, AVX2_PATH)
    results["load_average_at_end"] = list(os.getloadavg())
    return results


def _cell(entry: dict | None, key: str) -> str:
    if not entry:
        return "| |"
    if "patches_per_s" not in entry:
        return f"| skipped: {entry['skipped']} | |"
    return f"| {entry['patches_per_s']:.0f} | {entry[key]:.2f}x |"


def markdown(results: dict) -> str:
    default, avx2 = results["dispatch_paths"]["default"], results["dispatch_paths"]["avx2"]
    paths = (
        f"numpy dispatch: default = {' '.join(default['numpy']['dispatch_active'])}; "
        f'AVX2 path = NPY_DISABLE_CPU_FEATURES="{avx2["numpy"]["NPY_DISABLE_CPU_FEATURES"]}" '
        f"({' '.join(avx2['numpy']['dispatch_active'])}), in a child process"
    )
    lines = [
        f"Stain normalization, {results['patches']}; mixed set: {results['mixed_tiles']}; {results['threads']} "
        f"threads, median of {results['rounds']} interleaved passes, {machine_summary(results['machine'])}, "
        f"{paths}; load average at start {results['load_average_at_start'][0]:.1f}, "
        f"at end {results['load_average_at_end'][0]:.1f}; {results['date']}.",
        "",
        "| Macenko (equal-size patches) | patches/s, numpy default | vs torchstain | patches/s, numpy AVX2 "
        "| vs torchstain |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in default["macenko"].items():
        row = (
            _cell(entry, "speedup_vs_torchstain")
            + _cell(avx2["macenko"].get(name), "speedup_vs_torchstain")[1:]
        )
        lines.append(f"| {name} {row}")
    lines += [
        "",
        "| end to end (PIL → pixel_values) | images/s, numpy default | vs release | images/s, numpy AVX2 "
        "| vs release |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (("end_to_end", "equal-size patches"), ("end_to_end_mixed", "mixed sizes")):
        for name, entry in default[key].items():
            row = _cell(entry, "speedup_vs_release") + _cell(avx2[key].get(name), "speedup_vs_release")[1:]
            lines.append(f"| {name}, {label} {row}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--mixed", type=int, default=48, help="tiles in the mixed-size set")
    add_rounds_argument(parser, "timed passes per method, interleaved")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # measure() only, into this JSON file
    args = parser.parse_args(argv)
    if args.child is not None:
        measured = measure(args.threads, args.count, args.rounds, args.mixed, peers=False)
        args.child.write_text(json.dumps(measured), encoding="utf-8")
        return
    results = run_benchmark(args)
    table = markdown(results)
    save_results(args.out, "stain", results, table)
    print(table)


if __name__ == "__main__":
    main()
