"""Whole-slide tiling throughput and peak memory on CMU-1-Small-Region.svs, 1 and 2 worker processes.

    python benchmarks/bench_tile.py [--copies 24] [--rounds 5] [--baseline PATH]

The slide (2220x2967 px, 0.499 µm/px, 28 tissue patches of 257 px) is tiled as `--copies` symlinked copies,
so that two workers have slides to share. Every configuration runs in a fresh interpreter, round-robin over
the rounds so that load changes on the machine hit all alike. Peak memory is the largest summed PSS of the
process tree (sampled every 0.2 s; PSS splits pages shared between processes, so the sum is the real total),
next to the RSS after imports (importing the package pulls in torch and transformers). With 2 workers the
fork server is started before the clock starts (a one-off cost, reported in its own column). The peer is the
bare work the tiler cannot avoid: tiffslide `read_region` plus PNG encoding of the same patches in one loop,
without tissue detection, thumbnails, shards or bookkeeping. Every figure is the median over `--rounds` (at
least 5).

Start-up: the wall time of `exaonepath-tile --help` in a fresh interpreter and the memory of a fresh interpreter
after importing what each worker imports (`exaonepath_hf.tiling.pipeline`: RSS, and USS, the pages no other
process shares), for this tree and, with `--baseline`, for another checkout of the package (e.g. `git worktree
add /tmp/baseline <revision>`), interleaved. Writes benchmarks/results/tile.json and tile.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from harness import (
    REPOSITORY,
    RESULTS_DIR,
    add_rounds_argument,
    data_path,
    machine_record,
    machine_summary,
    save_results,
)

SLIDE = "wsi/CMU-1-Small-Region.svs"

CONFIGS = {
    "exaonepath-tile, 1 worker (tiffslide, PNG)": {"workers": 1, "backend": "tiffslide", "format": "png"},
    "exaonepath-tile, 2 workers (tiffslide, PNG)": {"workers": 2, "backend": "tiffslide", "format": "png"},
    "exaonepath-tile, 1 worker (tiffslide, JPEG q90)": {
        "workers": 1,
        "backend": "tiffslide",
        "format": "jpeg",
    },
    "exaonepath-tile, 1 worker (openslide, PNG)": {"workers": 1, "backend": "openslide", "format": "png"},
    "bare read + PNG encode loop (peer)": {"bare": True},
}


def run_one(spec: dict) -> dict:
    """Runs inside the child interpreter: tile (or run the bare loop) and report time and patch count."""
    from exaonepath_hf.tiling import TilingConfig, tile_slides

    import_rss = psutil.Process().memory_info().rss
    slides = spec["slides"]
    if spec.get("bare"):
        import io

        import tiffslide
        from PIL import Image

        start = time.perf_counter()
        for path in slides:
            slide = tiffslide.TiffSlide(path)
            for x, y in spec["coords"]:
                pixels = slide.read_region((x, y), 0, (257, 257), as_array=True)
                Image.fromarray(pixels).save(io.BytesIO(), format="PNG")
            slide.close()
        return {
            "seconds": time.perf_counter() - start,
            "patches": len(spec["coords"]) * len(slides),
            "import_rss": import_rss,
            "startup_seconds": 0.0,
        }
    startup = 0.0
    if spec["workers"] > 1:
        # Start the fork server (it imports the package once) outside the timed run: in a run over thousands
        # of slides this one-off cost vanishes. It is reported in its own column.
        from concurrent.futures import ProcessPoolExecutor

        from exaonepath_hf.tiling.pipeline import worker_process_context

        start = time.perf_counter()
        with ProcessPoolExecutor(1, mp_context=worker_process_context()) as pool:
            pool.submit(os.getpid).result()
        startup = time.perf_counter() - start
    config = TilingConfig(backend=spec["backend"], image_format=spec["format"])
    summary = tile_slides(slides, spec["out"], config, num_workers=spec["workers"], progress=False)
    assert summary.ok, summary.failures
    return {
        "seconds": summary.seconds,
        "patches": summary.num_patches,
        "import_rss": import_rss,
        "startup_seconds": startup,
    }


def measure(spec: dict) -> dict:
    """Run `spec` in a fresh interpreter while sampling the RSS of its whole process tree."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--run_one", json.dumps(spec)],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        text=True,
    )
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(child.pid)
        while not done.is_set():
            try:
                processes = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_full_info().pss for p in processes if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)  # reading smaps is not free: sample sparsely to leave the CPU to the run

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode:
        raise RuntimeError(f"benchmark run failed: {spec}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_pss"] = peak
    return result


WORKER_IMPORTS = """
import json, sys
import psutil
import exaonepath_hf.tiling.pipeline
memory = psutil.Process().memory_full_info()
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(json.dumps({"rss": memory.rss, "uss": memory.uss, "heavy": heavy}))
"""


def measure_startup(tree: Path) -> dict:
    """`exaonepath-tile --help` wall time and a worker's memory after imports, with the package from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory() as empty:  # not the project folder: `-c` puts the cwd on sys.path
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "from exaonepath_hf.tiling.cli import main; main(['--help'])"],
            cwd=empty,
            env=env,
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - start
        output = subprocess.run(
            [sys.executable, "-c", WORKER_IMPORTS],
            cwd=empty,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return {"help_seconds": seconds, **json.loads(output)}


def startup_rows(trees: dict[str, Path], rounds: int) -> dict:
    runs = {name: [] for name in trees}
    for _ in range(rounds):
        for name, tree in trees.items():
            runs[name].append(measure_startup(tree))
    return {
        name: {
            "help_seconds": round(statistics.median(r["help_seconds"] for r in measured), 2),
            "worker_rss_mb": round(statistics.median(r["rss"] for r in measured) / 2**20),
            "worker_uss_mb": round(statistics.median(r["uss"] for r in measured) / 2**20),
            "imports_torch_or_transformers": bool(measured[0]["heavy"]),
        }
        for name, measured in runs.items()
    }


def tiling_rows(slide: Path, copies: int, rounds: int) -> dict:
    """Every configuration of CONFIGS over `copies` symlinked copies of `slide`, `rounds` interleaved times;
    the medians per configuration."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "slides").mkdir()
        slides = []
        for i in range(copies):
            slides.append(tmp / "slides" / f"copy_{i:03d}.svs")
            os.symlink(slide, slides[-1])
        from exaonepath_hf.tiling import read_coords_csv, tile_slide

        reference = tile_slide(slide, tmp / "reference")
        coords = read_coords_csv(tmp / "reference" / reference.coords).xy.tolist()
        runs = {name: [] for name in CONFIGS}
        for round_index in range(rounds):
            for index, (name, options) in enumerate(CONFIGS.items()):
                spec = {
                    **options,
                    "slides": [str(s) for s in slides],
                    "out": str(tmp / f"out_{index}_{round_index}"),
                }
                if options.get("bare"):
                    spec["coords"] = coords
                runs[name].append(measure(spec))
                print(name, runs[name][-1], flush=True)
    rows = {}
    for name, measured in runs.items():
        seconds = statistics.median(r["seconds"] for r in measured)
        rows[name] = {
            "patches": measured[0]["patches"],
            "seconds": round(seconds, 3),
            "patches_per_second": round(measured[0]["patches"] / seconds, 1),
            "peak_pss_mb": round(statistics.median(r["peak_pss"] for r in measured) / 2**20),
            "import_rss_mb": round(statistics.median(r["import_rss"] for r in measured) / 2**20),
            "worker_startup_seconds": round(statistics.median(r["startup_seconds"] for r in measured), 2),
        }
    return rows


def markdown(record: dict) -> str:
    """The results tables of a run's record (what tile.md holds)."""
    lines = [
        f"Tiling `{record['slide']}` x {record['copies']} copies (256 px at 0.5 µm/px = 257 px at level 0, 28 "
        f"patches per copy), {machine_summary(record['machine'])}, median of {record['rounds']} interleaved "
        "rounds. The one-off start of the worker fork server is not in the time but in its own column.",
        "",
        "| configuration | patches/s | seconds | worker start-up (s) | peak PSS, process tree (MB) "
        "| RSS after imports (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in record["results"].items():
        lines.append(
            f"| {name} | {row['patches_per_second']} | {row['seconds']} | {row['worker_startup_seconds']} "
            f"| {row['peak_pss_mb']} | {row['import_rss_mb']} |"
        )
    lines += [
        "",
        "| package | `exaonepath-tile --help` (s) | worker after imports: RSS (MB) | USS (MB) "
        "| imports torch or transformers |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in record["startup"].items():
        lines.append(
            f"| {name} | {row['help_seconds']} | {row['worker_rss_mb']} | {row['worker_uss_mb']} "
            f"| {'yes' if row['imports_torch_or_transformers'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=24, help="symlinked copies of the slide to tile")
    add_rounds_argument(parser, "interleaved rounds per configuration")
    parser.add_argument(
        "--baseline", type=Path, help="another checkout of the package to compare start-up with"
    )
    parser.add_argument("--run_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return
    slide = data_path(SLIDE)
    try:
        import openslide  # noqa: F401
    except ImportError:
        CONFIGS.pop("exaonepath-tile, 1 worker (openslide, PNG)")
    rows = tiling_rows(slide, args.copies, args.rounds)
    trees = {"this tree": REPOSITORY}
    if args.baseline:
        revision = subprocess.run(
            ["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        trees[f"baseline {revision or args.baseline}"] = args.baseline.resolve()
    record = {
        "slide": slide.name,
        "copies": args.copies,
        "rounds": args.rounds,
        "machine": machine_record("psutil", "tiffslide", "pillow"),
        "results": rows,
        "startup": startup_rows(trees, args.rounds),
    }
    table = markdown(record)
    save_results(RESULTS_DIR, "tile", record, table)
    print(table)


if __name__ == "__main__":
    main()
