"""Slide-head training time on CPU: mean pooling and gated attention MIL, 1,000 slides x 2,000 x 768-d.

    python benchmarks/bench_slide.py [--threads 1 2] [--rounds 5] [--steps 3] [--quick]

The training set is 1,000 synthetic bags of 2,000 patches of 768 features, each bag a reference into a pool of
`--pool` bags generated once in float16 (the 1,000 distinct bags would take 3 GB in float16, 6 GB in float32;
the collate reads and pads the same amount either way). Each timed call is `eval.slide.probe.fit_head`, the
code `exaonepath-slide-probe` runs, for `--steps` optimizer steps at eva's batch of 32 bags under Accelerate
on the CPU; timed is its training loop (`HeadFit.train_seconds`: collate, i.e. pad and cast to float32;
forward; backward; AdamW; cosine schedule), not its set-up nor its validation. Heads: `mean` and `abmil`
(hidden 128, dropout 0.25), each on all 2,000 patches of a bag and on 1,000 sampled per bag (the CLI's
default `--max_patches`, as eva does), with 1 and with 2 intra-op threads (the CLI's `--cpu_threads`).

Rounds interleave the configurations, so a change of load on the machine hits all alike; reported: the
median over `--rounds` (at least 5) of seconds per step, times the steps of one epoch (the slides / 32 bags,
rounded up), and the 100 epochs (eva's epoch cap, below its step cap at this size) of one seed. The machine
(benchmarks/harness.py) and the load average are recorded. Writes benchmarks/results/slide.json and slide.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from accelerate import Accelerator
from harness import RESULTS_DIR, add_rounds_argument, machine_record, machine_summary, save_results

from exaonepath_hf.eval.slide.data import Bag
from exaonepath_hf.eval.slide.probe import fit_head
from exaonepath_hf.eval.slide.settings import HeadTrainingConfig

SLIDES, PATCHES, DIM, BATCH, EPOCHS = 1_000, 2_000, 768, 32, 100
HEADS = ("mean", "abmil")


def synthetic_bags(count: int, pool: int, patches: int, dim: int) -> list[Bag]:
    """`count` bags with alternating labels whose features cycle through `pool` float16 tensors."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(patches, dim, generator=generator).half() for _ in range(pool)]
    return [Bag(f"slide-{i:04d}", i % 2, tensors[i % pool]) for i in range(count)]


def time_steps(
    head: str, max_patches: int | None, steps: int, train: list[Bag], val: list[Bag], accelerator: Accelerator
) -> float:
    """Seconds per optimizer step of `fit_head`'s training loop (its set-up and validation excluded)."""
    config = HeadTrainingConfig(
        head=head, max_patches=max_patches, max_steps=steps, batch_size=BATCH, seeds=(0,)
    )
    fit = fit_head(train, val, config, num_classes=2, seed=0, accelerator=accelerator)
    assert fit.steps == steps, (fit.steps, steps)
    return fit.train_seconds / steps


def label(head: str, max_patches: int | None, threads: int, patches: int) -> str:
    kept = f"all {patches:,}" if max_patches is None else f"{max_patches:,} sampled"
    return f"{head}, {kept} patches per bag, {threads} thread{'s' if threads > 1 else ''}"


def markdown(record: dict) -> str:
    """The results table of a run's record (what slide.md holds)."""
    slides, patches, steps_per_epoch = (
        record["slides"],
        record["patches_per_slide"],
        record["steps_per_epoch"],
    )
    load = ", ".join(f"{value:.1f}" for value in record["load_average"])
    lines = [
        f"{machine_summary(record['machine'])}; load average {load} (1, 5, 15 min, at the end); median of "
        f"{record['rounds']} interleaved rounds of {record['steps_per_round']} steps.",
        "",
        f"| head ({slides:,} slides × {patches:,} patches × {record['feature_dim']}-d, batch "
        f"{record['batch_size']}, fp32 on CPU) | s / step | s / epoch ({steps_per_epoch} steps) "
        f"| {record['epochs_for_full_run']} epochs, one seed |",
        "|---|---:|---:|---:|",
    ]
    for config, step in record["seconds_per_step"].items():
        epoch = step * steps_per_epoch
        lines.append(
            f"| {config} | {step:.2f} | {epoch:.1f} | {epoch * record['epochs_for_full_run'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts to compare"
    )
    add_rounds_argument(parser)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration and round")
    parser.add_argument("--pool", type=int, default=64, help="distinct float16 bags the 1,000 cycle through")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 100 slides of 200 patches, printed, not saved"
    )
    args = parser.parse_args()
    slides, patches = (100, 200) if args.quick else (SLIDES, PATCHES)
    train = synthetic_bags(slides, min(args.pool, slides), patches, DIM)
    val = train[:2]
    accelerator = Accelerator(cpu=True)
    steps_per_epoch = math.ceil(slides / BATCH)

    configs = [
        (head, max_patches, threads)
        for threads in args.threads
        for max_patches in (None, patches // 2)
        for head in HEADS
    ]
    time_steps("abmil", None, 1, train, val, accelerator)  # warm-up: allocator, kernels
    seconds = {label(*config, patches): [] for config in configs}
    started = time.perf_counter()
    for round_index in range(args.rounds):
        for head, max_patches, threads in configs:
            torch.set_num_threads(threads)
            seconds[label(head, max_patches, threads, patches)].append(
                time_steps(head, max_patches, args.steps, train, val, accelerator)
            )
        print(f"round {round_index + 1}/{args.rounds}: {time.perf_counter() - started:.0f} s", flush=True)
    per_step = {name: statistics.median(values) for name, values in seconds.items()}

    record = {
        "slides": slides,
        "patches_per_slide": patches,
        "feature_dim": DIM,
        "batch_size": BATCH,
        "steps_per_epoch": steps_per_epoch,
        "epochs_for_full_run": EPOCHS,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "pool": args.pool,
        "quick": args.quick,
        "statistic": "median over interleaved rounds of seconds per step of fit_head's training loop "
        "(HeadFit.train_seconds: collate, forward, backward, AdamW, schedule; no set-up, no validation)",
        "machine": machine_record("torch", "accelerate"),
        "load_average": os.getloadavg(),
        "seconds_per_step": per_step,
        "seconds_per_epoch": {name: s * steps_per_epoch for name, s in per_step.items()},
        "seconds_per_step_by_round": seconds,
        "total_seconds": time.perf_counter() - started,
    }
    table = markdown(record)
    if not args.quick:
        save_results(RESULTS_DIR, "slide", record, table)
    print(table)


if __name__ == "__main__":
    main()
