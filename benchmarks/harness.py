"""What every benchmark shares: the record of the machine it ran on, the `--rounds` option, the shared test
data, and where the figures go.

The machine is recorded with every figure because the same code runs several times faster on one host than on
another of the same kind (numpy's and torch's kernels are picked by the CPU's SIMD flags). Rounds interleave
the configurations a benchmark compares, so that a change of load on a shared machine hits all of them alike;
the figures are medians over the rounds.

Imported by the `bench_*.py` scripts, which run as files (their folder is first on `sys.path`). It imports
neither torch nor numpy: bench_tile.py measures the memory of processes that import this module.

    python benchmarks/harness.py     # prints this machine's record
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
from pathlib import Path

from exaonepath_hf.atomic_io import atomic_write_text, write_json

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATA_ENV = "EXAONEPATH_TEST_DATA"
# the shared test data: real H&E images and the whole-slide file the tests and benchmarks read
DATA_DIR = Path(os.environ.get(DATA_ENV, REPOSITORY.parent / "shared" / "data"))
# a median of fewer rounds moves with the other work on a shared machine more than the effects measured
MIN_ROUNDS = 5

SIMD_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vbmi2",
    "avx512_fp16",
    "avx512_bf16",
    "amx_bf16",
)


def cpu_description() -> dict:
    """Vendor, family, model, model name and the SIMD flags that matter (Linux /proc/cpuinfo; else the platform
    module), and the number of CPUs."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    flags = set(fields.get("flags", "").split())
    return {
        "vendor": fields.get("vendor_id"),
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
        "model_name": fields.get("model name"),
        "simd_flags": [flag for flag in SIMD_FLAGS if flag in flags],
        "cpus": os.cpu_count(),
    }


def cpu_summary(cpu: dict) -> str:
    """One line for a results table: `2 CPUs, AuthenticAMD family 25 model 17 (AMD EPYC ...; avx2 avx512f)`."""
    if "vendor" not in cpu:
        return f"{cpu.get('cpus')} CPUs, {cpu.get('processor')}"
    return (
        f"{cpu['cpus']} CPUs, {cpu['vendor']} family {cpu['family']} model {cpu['model']} "
        f"({cpu['model_name']}; {' '.join(cpu['simd_flags'])})"
    )


def gpu_description() -> list[dict]:
    """Each CUDA device torch sees: name, compute capability, memory, and the CUDA version torch was built
    with; empty without one. Imports torch."""
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "name": properties.name,
                "capability": f"{properties.major}.{properties.minor}",
                "memory_gib": round(properties.total_memory / 2**30, 1),
                "cuda": torch.version.cuda,
            }
        )
    return devices


def machine_record(*packages: str, gpu: bool = False) -> dict:
    """Where a benchmark ran: the CPU, the platform, Python, the installed versions of `packages`
    (distribution names, read without importing them) and, with `gpu`, the CUDA devices."""
    record = {
        "cpu": cpu_description(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: importlib.metadata.version(name) for name in packages},
    }
    if gpu:
        record["gpus"] = gpu_description()
    return record


def machine_summary(machine: dict) -> str:
    """The first words of a results table: the CPU (and the GPUs) and the versions of a `machine_record`."""
    parts = [cpu_summary(machine["cpu"])]
    parts += [f"{gpu['name']} (CUDA {gpu['cuda']})" for gpu in machine.get("gpus", ())]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    return "; ".join(parts + [f"{versions}, python {machine['python']}"])


def _rounds(text: str) -> int:
    rounds = int(text)
    if rounds < MIN_ROUNDS:
        raise argparse.ArgumentTypeError(
            f"{rounds} is fewer than {MIN_ROUNDS}: the figures are medians over rounds, and a median of fewer "
            "is too noisy on a shared machine"
        )
    return rounds


def add_rounds_argument(parser: argparse.ArgumentParser, what: str = "interleaved rounds") -> None:
    """`--rounds N` (default and minimum `MIN_ROUNDS`): how many times each configuration is measured."""
    parser.add_argument(
        "--rounds", type=_rounds, default=MIN_ROUNDS, help=f"{what} (median reported; at least {MIN_ROUNDS})"
    )


def data_path(relative: str) -> Path:
    """`relative` in the shared test data; exits naming `EXAONEPATH_TEST_DATA` when it is not there."""
    path = DATA_DIR / relative
    if not path.exists():
        raise SystemExit(f"{path} not found; set {DATA_ENV} to the shared test-data folder")
    return path


def save_results(out_dir: Path, name: str, record: dict, table: str) -> None:
    """``name``.json (the record) and ``name``.md (the table the README quotes) in ``out_dir``, each written
    atomically: an interrupted run leaves the previous figures whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", record)
    atomic_write_text(out_dir / f"{name}.md", table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print this machine's record, as the benchmarks save it.")
    parser.add_argument("packages", nargs="*", default=["torch", "numpy"], help="distributions to list")
    parser.add_argument("--gpu", action="store_true", help="also list the CUDA devices (imports torch)")
    args = parser.parse_args()
    print(json.dumps(machine_record(*args.packages, gpu=args.gpu), indent=2))
