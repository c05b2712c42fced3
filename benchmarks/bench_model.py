"""Backbone throughput on CPU: ours (SDPA, eager) against timm's ViT-B/16, in one run.

    python benchmarks/bench_model.py [--batch 32] [--repeats 5] [--threads 2]

The three models carry the same weights and run round-robin (one batch each, in turn), so a load change on the
machine hits all of them alike. Reported: the median over rounds of images/s, and of each round's ratio to timm
(a ratio within one round is taken under the same load). Writes benchmarks/results/model.json and model.md.
"""

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
import transformers
from machine import cpu_description, cpu_summary, save_results

from exaonepath_hf import ExaonePathConfig, ExaonePathModel

RESULTS = Path(__file__).parent / "results"


def build_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    reference = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    models = {"timm vit_base_patch16_224": reference}
    for implementation in ("sdpa", "eager"):
        ours = ExaonePathModel(ExaonePathConfig(attn_implementation=implementation)).eval()
        ours.load_state_dict(reference.state_dict())
        models[f"exaonepath-hf ({implementation})"] = ours
    return models


def features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    output = model(pixel_values)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median; at least 5)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5: the figures are medians over rounds")
    torch.set_num_threads(args.threads)
    models = build_models()
    pixel_values = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    seconds = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            features(model, pixel_values)  # warm-up: allocator, kernels
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                features(model, pixel_values)
                seconds[name].append(time.perf_counter() - start)
    reference = "timm vit_base_patch16_224"
    images_per_second = {
        name: statistics.median(args.batch / s for s in times) for name, times in seconds.items()
    }
    relative = {
        name: statistics.median(timm_s / s for timm_s, s in zip(seconds[reference], times, strict=True))
        for name, times in seconds.items()
    }
    cpu = cpu_description()
    record = {
        "batch": args.batch,
        "image_size": 224,
        "dtype": "float32",
        "threads": args.threads,
        "repeats": args.repeats,
        "statistic": "median over interleaved rounds (ratios: median of per-round ratios)",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "images_per_second": images_per_second,
        "relative_to_timm": relative,
        "seconds_per_batch": seconds,
    }
    lines = [
        f"{cpu_summary(cpu)}; torch {torch.__version__}, timm {timm.__version__}, transformers "
        f"{transformers.__version__}; median of {args.repeats} interleaved rounds.",
        "",
        f"| backbone (ViT-B/16, batch {args.batch}, 224 px, fp32, {args.threads} threads) | images/s | vs timm |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {images_per_second[name]:.2f} | {relative[name]:.2f}× |" for name in images_per_second
    ]
    save_results(RESULTS, "model", record, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
