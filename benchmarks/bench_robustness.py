"""Robustness index and paired retrieval on 100k x 768 features: the fast exact search against the plain one.

    python benchmarks/bench_robustness.py [--size 100000] [--dim 768] [--rounds 5] [--baseline_rounds 1]
        [--threads 2]

Times `robustness_index(k=11, bootstrap=1000)` followed by `paired_retrieval` (ks 1 and 10) on one
`NeighbourIndex`, end to end, as `eval.robustness.run` calls them. The features are synthetic but shaped like a
virtual-labs run: `--size` unit vectors of `--dim`, `--centres` labs (default 4) each holding the same size /
centres tiles (every tile paired under every lab), 8 tissue classes, cases of 100 tiles shared by all labs (the
same source image re-stained per lab); a tile is a common direction + its class + its case + its own morphology
(mostly in a low-dimensional subspace, so that tiles have close neighbours) + its lab's shift + per-lab noise.
The mix is tuned so that the metrics land mid-range (robustness index about 0.8, paired top-1 about 0.9), where
neighbour lists are neither trivial nor random.

Rounds: `--rounds` (at least 5) of the fast path (median and range reported) and `--baseline_rounds` of the
plain path (the float32 blocked search of every query row, the code before the fast path; one round takes about
five minutes at 100k, so one is the default), interleaved: the baseline runs after the first fast round. Every
fast round's metrics are compared with the baseline's, and where the two paths chose different neighbours, float64
similarities say which is right (`compare_neighbours`). The machine (benchmarks/harness.py), the dtype of the
approximate products (bfloat16 where torch multiplies it natively), the threads and the load average before and
after every round are recorded. Writes benchmarks/results/robustness.json and robustness.md. For a quick look:
`--size 50000 --baseline_rounds 0` (the fast path only).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from harness import RESULTS_DIR, add_rounds_argument, machine_record, machine_summary, save_results

from exaonepath_hf.eval.robustness.fast_search import approximate_dtype
from exaonepath_hf.eval.robustness.metrics import paired_retrieval, robustness_index
from exaonepath_hf.eval.robustness.neighbours import NeighbourIndex

TARGET_SECONDS = 60


def synthetic_features(
    size: int, dim: int, centres: int = 4, classes: int = 8, case_size: int = 100, seed: int = 0
) -> dict:
    """Features [size, dim] (float32) and per-sample labels, centres, case ids and pair ids (see the module
    docstring); `size` must be a multiple of `centres`."""
    if size % centres:
        raise ValueError(f"--size {size} must be a multiple of --centres {centres}")
    generator = torch.Generator().manual_seed(seed)

    def directions(count: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=1)

    tiles = size // centres
    num_cases = max(1, tiles // case_size)
    case_of_tile = torch.arange(tiles) % num_cases
    label_of_tile = torch.randint(0, classes, (num_cases,), generator=generator)[case_of_tile]
    common, class_dirs = directions(1), directions(classes)
    case_dirs, centre_dirs, morphology = directions(num_cases), directions(centres), directions(8)
    tissue = torch.randn(tiles, 8, generator=generator) @ morphology + 0.3 * directions(tiles)
    tissue = torch.nn.functional.normalize(tissue, dim=1)
    base = 0.55 * common + 0.25 * class_dirs[label_of_tile] + 0.3 * case_dirs[case_of_tile] + 0.6 * tissue
    features = torch.cat([base + 0.2 * centre_dirs[c] + 0.35 * directions(tiles) for c in range(centres)])
    return {
        "features": features.contiguous(),
        "labels": label_of_tile.repeat(centres).numpy(),
        "centers": np.repeat([f"lab{c}" for c in range(centres)], tiles),
        "case_ids": np.char.add("case", case_of_tile.repeat(centres).numpy().astype(str)),
        "pair_ids": np.char.add("tile", np.tile(np.arange(tiles), centres).astype(str)),
    }


def one_round(data: dict, fast: bool) -> tuple[dict, dict]:
    """Both metrics on one neighbour index built on a fresh copy of the features (as a new run would build it),
    timed; the plain path when not ``fast``. Also returns the neighbours behind the metrics (for
    `compare_neighbours`), recorded on the way: every `top_k` answer (the robustness index's first, then the
    plain path's pools) and the fast path's counterpart ranks."""
    recorded: dict = {"nearest": [], "ranks": None}
    top_k, counterpart_ranks = NeighbourIndex.top_k, NeighbourIndex.counterpart_ranks

    def recording_top_k(index: NeighbourIndex, *args, **kwargs):
        recorded["nearest"].append(top_k(index, *args, **kwargs))
        return recorded["nearest"][-1]

    def recording_ranks(index: NeighbourIndex, *args, **kwargs):
        recorded["ranks"] = counterpart_ranks(index, *args, **kwargs)
        return recorded["ranks"]

    NeighbourIndex.top_k, NeighbourIndex.counterpart_ranks = recording_top_k, recording_ranks
    features = data["features"].clone()
    load_before = os.getloadavg()
    try:
        start = time.perf_counter()
        index = NeighbourIndex(features, fast_path=fast)
        ri = robustness_index(index, data["labels"], data["centers"], data["case_ids"], k=11, bootstrap=1000)
        middle = time.perf_counter()
        paired = paired_retrieval(index, data["pair_ids"], data["centers"])
        end = time.perf_counter()
    finally:
        NeighbourIndex.top_k, NeighbourIndex.counterpart_ranks = top_k, counterpart_ranks
    entry = {
        "path": "fast" if fast else "plain",
        "robustness_index_s": round(middle - start, 2),
        "paired_retrieval_s": round(end - middle, 2),
        "total_s": round(end - start, 2),
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "robustness_index": ri.to_dict(),
        "paired_retrieval": {key: value for key, value in paired.to_dict().items() if key != "reason"},
    }
    return entry, recorded


def compare_neighbours(data: dict, fast: dict, plain: dict) -> dict:
    """Where the fast and the plain path chose different neighbours (the robustness index's top 11) or judged a
    tile's counterpart differently (paired top-1 and top-10): which of the two float64 similarities side with.

    The plain path's float32 products can misorder similarities closer than float32 rounding; the fast path
    decides with float64 similarities.
    """
    wide = torch.nn.functional.normalize(data["features"], dim=1).double()
    cases = np.unique(data["case_ids"], return_inverse=True)[1]
    report: dict = {
        "robustness_index_rows_differing": 0,
        "paired_tiles_differing": 0,
        "float64_sides_with": [],
    }
    fast_top, plain_top = fast["nearest"][0], plain["nearest"][0]
    for row in np.flatnonzero([set(a) != set(b) for a, b in zip(fast_top, plain_top, strict=True)]):
        similarity = (wide @ wide[row]).numpy()
        similarity[cases == cases[row]] = -np.inf
        exact = set(np.lexsort((np.arange(len(similarity)), -similarity))[:11])
        report["robustness_index_rows_differing"] += 1
        report["float64_sides_with"].append(
            "fast" if exact == set(fast_top[row]) else "plain" if exact == set(plain_top[row]) else "neither"
        )
    # the plain path's pools, in the order of its condition pairs: [2m, 10] nearest each, a's tiles first
    centres = sorted(set(data["centers"]))
    pools = iter(plain["nearest"][1:])

    def by_pair(rows: np.ndarray) -> np.ndarray:
        return rows[np.argsort(data["pair_ids"][rows], kind="stable")]

    for a, b in itertools.combinations(range(len(centres)), 2):
        nearest = next(pools)
        m = len(nearest) // 2
        counterpart = np.concatenate([np.arange(m, 2 * m), np.arange(m)])
        ranks = fast["ranks"][a, b].numpy()
        # pool order as paired_retrieval builds it: a's tiles then b's, each by pair id
        pool = np.concatenate([by_pair(np.flatnonzero(data["centers"] == centres[c])) for c in (a, b)])
        for k in (1, 10):
            plain_found = (nearest[:, :k] == counterpart[:, None]).any(axis=1)
            for tile in np.flatnonzero(plain_found != (ranks < k)):
                similarity = (wide[pool] @ wide[pool[tile]]).numpy()
                similarity[tile] = -np.inf
                target = similarity[counterpart[tile]]
                ahead = (similarity > target) | (
                    (similarity == target) & (np.arange(len(pool)) < counterpart[tile])
                )
                report["paired_tiles_differing"] += 1
                report["float64_sides_with"].append(
                    "fast" if (ahead.sum() < k) == (ranks[tile] < k) else "plain"
                )
    return report


def _summary(rounds: list[dict]) -> dict:
    summary = {}
    for key in ("robustness_index_s", "paired_retrieval_s", "total_s"):
        values = [entry[key] for entry in rounds]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


def run_benchmark(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    data = synthetic_features(args.size, args.dim, args.centres)
    dtype = approximate_dtype(torch.device("cpu"))
    results: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "machine": machine_record("torch", "numpy"),
        "approximate_products": str(dtype).removeprefix("torch."),
        "threads": args.threads,
        "features": f"{args.size} x {args.dim} float32, {args.centres} labs x {args.size // args.centres} "
        "paired tiles, 8 classes, cases of 100 tiles shared by the labs (synthetic)",
        "calls": "robustness_index(k=11, bootstrap=1000) then paired_retrieval(ks=(1, 10)) on one NeighbourIndex",
        "target_s": TARGET_SECONDS,
    }
    order = ["fast"] + ["plain"] * args.baseline_rounds + ["fast"] * (args.rounds - 1)
    rounds, recorded = [], {}
    for index, path in enumerate(order, 1):
        entry, neighbours = one_round(data, fast=path == "fast")
        rounds.append(entry)
        recorded.setdefault(path, neighbours)
        print(
            f"round {index}/{len(order)} {path}: RI {entry['robustness_index_s']} s, paired "
            f"{entry['paired_retrieval_s']} s, total {entry['total_s']} s "
            f"(load {entry['load_average_before'][0]:.1f} -> {entry['load_average_after'][0]:.1f})",
            flush=True,
        )
    fast = [entry for entry in rounds if entry["path"] == "fast"]
    plain = [entry for entry in rounds if entry["path"] == "plain"]
    results["rounds"] = rounds
    results["fast"] = _summary(fast)
    if plain:
        results["plain"] = _summary(plain)
        reference = plain[0]
        results["metrics_equal_to_plain"] = all(
            entry["robustness_index"] == reference["robustness_index"]
            and entry["paired_retrieval"] == reference["paired_retrieval"]
            for entry in fast
        )
        results["speedup"] = round(
            results["plain"]["total_s"]["median"] / results["fast"]["total_s"]["median"], 2
        )
        results["neighbours"] = compare_neighbours(data, recorded["fast"], recorded["plain"])
    results["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    return results


def markdown(results: dict) -> str:
    fast, plain = results["fast"], results.get("plain")
    counts = {path: sum(entry["path"] == path for entry in results["rounds"]) for path in ("fast", "plain")}
    others = results["load_average_at_start"][0]
    lines = [
        f"{results['features']}; {results['calls']}; {results['threads']} threads, "
        f"{machine_summary(results['machine'])}; approximate products in {results['approximate_products']}; "
        f"fast path: median of {counts['fast']} rounds (range in brackets), plain path: "
        f"{counts['plain']} round(s), interleaved; 1-min load average {others:.1f} at the start (the rounds' own "
        f"{results['threads']} threads then add about {results['threads']}); {results['date']}.",
        "",
        "| search | robustness index (s) | paired retrieval (s) | both (s) | target |",
        "|---|---:|---:|---:|---|",
    ]

    def cell(summary: dict, key: str) -> str:
        entry = summary[key]
        if entry["min"] == entry["max"]:
            return f"{entry['median']:.1f}"
        return f"{entry['median']:.1f} ({entry['min']:.1f}-{entry['max']:.1f})"

    target = results["target_s"]
    met = "meets" if fast["total_s"]["median"] <= target else "misses"
    lines.append(
        f"| fast exact (bfloat16 candidates, float64 re-rank, one pass for both) | "
        f"{cell(fast, 'robustness_index_s')} | {cell(fast, 'paired_retrieval_s')} | {cell(fast, 'total_s')} | "
        f"{met} ≤ {target} s |"
    )
    if plain is not None:
        lines.append(
            f"| plain float32 blocks (before) | {cell(plain, 'robustness_index_s')} | "
            f"{cell(plain, 'paired_retrieval_s')} | {cell(plain, 'total_s')} | |"
        )
        lines += ["", f"Speed-up {results['speedup']}x. {_agreement(results)}"]
    return "\n".join(lines) + "\n"


def _agreement(results: dict) -> str:
    if results["metrics_equal_to_plain"]:
        return "Every fast round's metrics equal the plain path's."
    fast, plain = (next(e for e in results["rounds"] if e["path"] == path) for path in ("fast", "plain"))
    ri_fast, ri_plain = fast["robustness_index"], plain["robustness_index"]
    same_paired = "equal" if fast["paired_retrieval"] == plain["paired_retrieval"] else "different"
    found = results["neighbours"]
    sides = found["float64_sides_with"]
    return (
        f"Robustness index {ri_fast['value']:.6f} (SO {ri_fast['so']}, OS {ri_fast['os']}) against the plain "
        f"path's {ri_plain['value']:.6f} ({ri_plain['so']}, {ri_plain['os']}): "
        f"{found['robustness_index_rows_differing']} queries got a different 11th neighbour; paired retrieval "
        f"{same_paired} ({found['paired_tiles_differing']} tile judgements differ). Where the paths differ, float64 "
        f"similarities side with the fast path ({sides.count('fast')} of {len(sides)}): the plain path's float32 "
        "products misorder similarities closer than float32 rounding."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--centres", type=int, default=4)
    add_rounds_argument(parser, "rounds of the fast path")
    parser.add_argument("--baseline_rounds", type=int, default=1, help="rounds of the plain path (slow)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    results = run_benchmark(args)
    table = markdown(results)
    save_results(args.out, "robustness", results, table)
    print(table)


if __name__ == "__main__":
    main()
