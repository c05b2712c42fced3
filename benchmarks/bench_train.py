"""DINO pretraining throughput on CPU: the data pipeline per loader worker, the training step, workers per GPU.

    python benchmarks/bench_train.py            # writes benchmarks/results/train.{json,md}

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
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from exaonepath_hf import ExaonePathConfig, ExaonePathModel
from exaonepath_hf.stain_normalization import MacenkoNormalizer
from exaonepath_hf.train.dino.augmentations import AugmentationConfig, DINOMultiCrop
from exaonepath_hf.train.dino.data import PatchSource, PatchStream, load_patch_dataset
from exaonepath_hf.train.dino.head import DINOHead
from exaonepath_hf.train.dino.loss import DINOLoss
from exaonepath_hf.train.dino.model import MultiCropNetwork
from exaonepath_hf.train.dino.teacher import build_teacher

ROOT = Path(__file__).resolve().parents[1]

TARGET_COST = 1.3  # the bound on the pipeline's slowdown from Macenko
DATA = Path(os.environ.get("EXAONEPATH_TEST_DATA", ROOT.parent / "shared" / "data"))


def patch_sets() -> dict[str, list[Path]]:
    tcga = DATA / "tcga-tiles"
    return {
        "256px (0.5 MPP, paper)": sorted((tcga / "TCGA-3X-AAVA-01Z-00-DX1").iterdir())
        + sorted((DATA / "he-images").glob("gigapath_01581x_*.png")),
        "512px (0.25 MPP)": sorted((tcga / "TCGA-AD-6964-01Z-00-DX1").iterdir())
        + sorted((DATA / "tiles").glob("*nuclei-score-level0.png")),
        "224px (CRC-VAL-HE-7K)": sorted((DATA / "crc-val-he-7k-samples").glob("*.png"))[:16],
    }


class TorchstainNormalizer:
    """The release's Macenko (torchstain, torch backend) behind our normalizer's interface, as a peer."""

    def __init__(self) -> None:
        import torchstain

        self.impl = torchstain.normalizers.MacenkoNormalizer(backend="torch")

    def normalize(self, images: torch.Tensor):
        from exaonepath_hf.stain_normalization import MacenkoOutput

        image = images[0]
        try:
            normalized, _, _ = self.impl.normalize(I=image.float(), stains=False)
            result = normalized.permute(2, 0, 1).float() / 255
            ok = True
        except Exception:  # the release's fallback: the image unchanged
            result, ok = image.float() / 255, False
        return MacenkoOutput(images=result.unsqueeze(0), normalized=torch.tensor([ok]))


def pipeline_images_per_s(files: list[Path], variants: dict, repeats: int) -> tuple[dict, list[dict]]:
    """Images per CPU-second of this single-threaded process (a loader worker owns one core).

    CPU time rather than wall time (on a shared machine the wall clock mostly measures the neighbours), and
    `repeats` interleaved passes: returns the best rate per variant and every pass's rates, so that costs
    can be taken from passes run side by side.
    """
    dataset, column = load_patch_dataset(PatchSource("imagefolder", tuple(str(f) for f in files)))
    iterators = {}
    for name, normalizer in variants.items():
        stream = PatchStream(
            dataset, column, DINOMultiCrop(AugmentationConfig()), 1, seed=0, normalizer=normalizer
        )
        iterators[name] = iter(stream)
        next(iterators[name])  # warm-up
    passes = []
    for _ in range(repeats):
        rates = {}
        for name, iterator in iterators.items():
            start = time.process_time()
            for _ in range(len(files)):
                next(iterator)
            rates[name] = len(files) / (time.process_time() - start)
        passes.append(rates)
    best = {name: max(p[name] for p in passes) for name in variants}
    return best, passes


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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved passes per variant")
    parser.add_argument("--gpu_tflops", type=float, default=312.0, help="A100 dense bf16 peak")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation on the GPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"real H&E patches not found at {DATA}; set EXAONEPATH_TEST_DATA")
    torch.set_num_threads(1)  # what a DataLoader worker gets
    torch.manual_seed(0)

    pipeline = []
    variants = {"no stain normalization": None, "exaonepath_hf Macenko": MacenkoNormalizer()}
    try:
        variants["torchstain Macenko (release)"] = TorchstainNormalizer()
    except ImportError:
        print("torchstain not installed: peer skipped")
    for set_name, files in patch_sets().items():
        best, passes = pipeline_images_per_s(files, variants, args.repeats)
        row = {"patches": set_name, "num_files": len(files), **best}
        for variant in variants:
            print(f"{set_name:24s} {variant:30s} {row[variant]:7.1f} images per CPU-second", flush=True)
        # Median over side-by-side passes of (time with Macenko / time without).
        row["macenko_cost"] = statistics.median(
            [p["no stain normalization"] / p["exaonepath_hf Macenko"] for p in passes]
        )
        pipeline.append(row)

    torch.set_num_threads(os.cpu_count() or 1)
    steps = [
        training_images_per_s("tiny ViT (cpu_smoke sizes, 224/96 crops)", (64, 2, 2, 4096, 256, 64), 8, 3),
        training_images_per_s("ViT-B/16 (paper)", (768, 12, 12, 65536, 2048, 256), 2, 1),
    ]
    for step in steps:
        print(
            f"training step {step['model']}: {step['images_per_cpu_s']:.2f} images per CPU-second", flush=True
        )
    flops = flops_per_image()
    gpu_images_per_s = args.gpu_tflops * 1e12 * args.mfu / flops
    workers = {row["patches"]: {v: gpu_images_per_s / row[v] for v in variants} for row in pipeline}
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "pipeline_images_per_cpu_second_per_worker": pipeline,
        "training_step_cpu": steps,
        "vit_b16_dino_flops_per_image": flops,
        "gpu_assumption": {"peak_tflops": args.gpu_tflops, "mfu": args.mfu},
        "gpu_images_per_s_estimate": gpu_images_per_s,
        "workers_per_gpu": workers,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(result, indent=2))
    (args.out / "train.md").write_text(markdown(result, list(variants)))
    print((args.out / "train.md").read_text())
    return 0


def markdown(result: dict, variants: list[str]) -> str:
    lines = [
        "### DINO data pipeline, one loader worker (1 CPU thread): images per CPU-second",
        "",
        "decode → stain normalization → 2×224 + 8×96 DINO crops, on real H&E patches; best of the passes. Macenko",
        "cost = CPU time per image with this package's Macenko / without, median over passes run side by side;",
        f"the target is ≤ {TARGET_COST}×.",
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
    machine = result["machine"]
    lines += [
        "",
        f"Measured on {machine['cpu_count']} CPU cores ({machine['platform']}), torch {machine['torch']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
