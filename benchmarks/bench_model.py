"""Backbone throughput on CPU: ours (SDPA, eager) against timm's ViT-B/16, in one run.

    python benchmarks/bench_model.py [--batch 32] [--rounds 5] [--threads 2]

The three models carry the same weights and run round-robin (one batch each, in turn), so a load change on the
machine hits all of them alike. Reported: the median over rounds of images/s, and of each round's ratio to timm
(a ratio within one round is taken under the same load). Writes benchmarks/results/model.json and model.md.
"""

import argparse
import statistics
import time

import timm
import torch
from harness import RESULTS_DIR, add_rounds_argument, machine_record, machine_summary, save_results

from exaonepath_hf import ExaonePathConfig, ExaonePathModel

REFERENCE = "timm vit_base_patch16_224"


def build_models(timm_name: str = "vit_base_patch16_224", **config) -> dict[str, torch.nn.Module]:
    """timm's ViT and ours (SDPA and eager attention) with the same weights; `config`: ExaonePathConfig fields
    that match `timm_name` (e.g. ViT-Ti/16: `vit_tiny_patch16_224`, hidden_size=192, num_attention_heads=3)."""
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False, num_classes=0).eval()
    models = {f"timm {timm_name}": reference}
    for implementation in ("sdpa", "eager"):
        ours = ExaonePathModel(ExaonePathConfig(attn_implementation=implementation, **config)).eval()
        ours.load_state_dict(reference.state_dict())
        models[f"exaonepath-hf ({implementation})"] = ours
    return models


def features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    output = model(pixel_values)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def markdown(record: dict) -> str:
    """The results table of a run's record (what model.md holds)."""
    lines = [
        f"{machine_summary(record['machine'])}; median of {record['rounds']} interleaved rounds.",
        "",
        f"| backbone (ViT-B/16, batch {record['batch']}, 224 px, fp32, {record['threads']} threads) | images/s "
        "| vs timm |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {rate:.2f} | {record['relative_to_timm'][name]:.2f}× |"
        for name, rate in record["images_per_second"].items()
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    add_rounds_argument(parser)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = build_models()
    pixel_values = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    seconds = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            features(model, pixel_values)  # warm-up: allocator, kernels
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                features(model, pixel_values)
                seconds[name].append(time.perf_counter() - start)
    record = {
        "batch": args.batch,
        "image_size": 224,
        "dtype": "float32",
        "threads": args.threads,
        "rounds": args.rounds,
        "statistic": "median over interleaved rounds (ratios: median of per-round ratios)",
        "machine": machine_record("torch", "timm", "transformers"),
        "images_per_second": {
            name: statistics.median(args.batch / s for s in times) for name, times in seconds.items()
        },
        "relative_to_timm": {
            name: statistics.median(timm_s / s for timm_s, s in zip(seconds[REFERENCE], times, strict=True))
            for name, times in seconds.items()
        },
        "seconds_per_batch": seconds,
    }
    table = markdown(record)
    save_results(RESULTS_DIR, "model", record, table)
    print(table)


if __name__ == "__main__":
    main()
