"""The machine a benchmark ran on, recorded with every figure: the same code runs several times faster on one
host than on another of the same kind (numpy's and torch's kernels are picked by the CPU's SIMD flags); and
where the figures go.

Imported by the `bench_*.py` scripts, which run as files (their folder is first on `sys.path`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from exaonepath_hf.atomic_io import atomic_write_text, write_json

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


def save_results(out_dir: Path, name: str, record: dict, table: str) -> None:
    """``name``.json (the record) and ``name``.md (the table the README quotes) in ``out_dir``, each written
    atomically: an interrupted run leaves the previous figures whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", record)
    atomic_write_text(out_dir / f"{name}.md", table)
