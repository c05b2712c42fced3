"""`benchmarks/bench_gpu.py --dry_run`: the GPU benchmark runs end to end on the CPU at tiny sizes, says that it
is a dry run, and writes every stage's figures and equality checks (the GPU figures come from a GPU run)."""

import json
import os
import subprocess
import sys

from conftest import PROJECT_ROOT


def test_dry_run_measures_every_stage(shared_data, tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_gpu.py"), "--dry_run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "EXAONEPATH_TEST_DATA": str(shared_data)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((out / "gpu.json").read_text())
    assert record["dry_run"] is True
    assert set(record) >= {"macenko", "processor", "model", "extract", "dino"}
    assert record["macenko"]["flags_equal_default_vs_8_image_chunks"]
    assert record["macenko"]["max_abs_default_vs_8_image_chunks"] <= 1e-5
    assert record["processor"]["flags_equal_device_vs_cpu"]
    extract = record["extract"]
    assert extract["patches"] >= 8 and set(extract["runs"]) == {
        "processor on the GPU",
        "processor in the loader workers",
    }
    table = (out / "gpu.md").read_text()
    assert table.startswith("DRY RUN on the CPU") and "exaonepath-extract --help" in table
