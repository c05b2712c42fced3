"""The "Robustness" table of README.md and the model card, generated from one offline run.

    python benchmarks/run_robustness_table.py [--train_steps 40] [--work_dir DIR]
    python benchmarks/update_readme.py        # copies the table into README.md and model_card.md

The issue's run: `exaonepath-robustness --virtual_labs` (through `run_robustness`) on the 32 CRC-VAL-HE-7K tiles
of the shared test data (the class is the file name's prefix), each re-stained as the protocol's virtual labs,
raw and Macenko input, for two models:

- a randomly initialised EXAONEPath-architecture ViT of the demo model's size (seed 0, `save_pretrained`): what
  the architecture and the preprocessing give without any training;
- the demo's DINO model: `exaonepath-demo`'s own tiling of the bundled slide and `pretrain_demo_model`.

Neither is EXAONEPath's released model (its weights are gated). Timed: the robustness run (the issue's budget,
`BUDGET_SECONDS`, with features extracted afresh into the work folder's cache) and the whole script; one run,
not a median over rounds. The machine (benchmarks/harness.py), the load average before and after and the date
are recorded. Writes benchmarks/results/robustness_table.md
and robustness_table.json; with `--work_dir` the run's own outputs (robustness.md, t-SNE PNGs, features) stay
there.
"""

# ruff: noqa: E402  (the hub is switched off before huggingface_hub, via datasets, reads the environment)
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from harness import RESULTS_DIR, data_path, machine_record, machine_summary, save_results

from exaonepath_hf import ExaonePathConfig, ExaonePathModel
from exaonepath_hf.demo import SAMPLE_SLIDE, DemoSettings, pretrain_demo_model, tile_sample
from exaonepath_hf.eval.robustness.run import RobustnessSettings, run_robustness

BUDGET_SECONDS = 300
SEED = 0


def labelled_crc_tiles(folder: Path) -> Path:
    """The CRC-VAL-HE-7K samples of the shared test data copied into class subfolders (`ADI-TCGA-….png` ->
    `ADI/`), the layout `--virtual_labs` reads labels from."""
    for path in sorted(data_path("crc-val-he-7k-samples").glob("*.png")):
        target = folder / path.name.split("-")[0] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return folder


def random_vit(like: Path, out: Path, seed: int) -> Path:
    """An untrained model with the architecture of the folder `like`, seeded, saved with `save_pretrained`."""
    config = ExaonePathConfig.from_pretrained(like)
    torch.manual_seed(seed)
    ExaonePathModel(config).save_pretrained(out)
    return out


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _robustness_index(metrics: dict) -> str:
    if metrics["robustness_index"] is None:
        return "–"
    ci = metrics["robustness_index_ci"]
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{metrics['robustness_index']:.3f} ({metrics['robustness_index_k']}){interval}"


def render_table(record: dict) -> str:
    counts, labs = record["data"]["counts"], record["data"]["virtual_labs"]
    seconds, load = record["seconds"], record["load_average"]
    lines = [
        f"Data: {counts['cases']} CRC-VAL-HE-7K tiles ({counts['classes']} classes) × {len(labs)} virtual labs "
        f"({', '.join(lab['name'] for lab in labs)}: HED perturbations and Reinhard transfers, not Macenko) = "
        f"{counts['samples']} images; the labs differ in stain only, not in scanner or tissue processing. "
        "Models: NOT EXAONEPath's released weights (gated) but a randomly initialised ViT of the demo's size "
        f"and the demo's DINO ViT ({record['train_steps']} steps on {SAMPLE_SLIDE}); they show the protocol, "
        "not EXAONEPath's robustness.",
        "",
        "| Model | Input | Robustness index (k) [95% CI] ↑ | Paired cosine ↑ (unpaired) | Paired top-1 ↑ "
        "| Paired top-10 ↑ | Clustering score ↑ | Lab-ID kNN (chance) ↓ |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in record["records"]:
        metrics = row["metrics"]
        identity = (
            f"{metrics['slide_identity_knn']:.3f} ({metrics['slide_identity_chance']:.3f})"
            if metrics["slide_identity_knn"] is not None
            else "–"
        )
        cells = [
            _robustness_index(metrics),
            f"{_number(metrics['paired_cosine'])} ({_number(metrics['paired_unpaired_cosine'])})",
            _number(metrics["paired_top1"]),
            _number(metrics["paired_top10"]),
            _number(metrics["clustering_score"]),
            identity,
        ]
        lines.append(f"| {row['model']} | {row['setting']} | " + " | ".join(cells) + " |")
    before = ", ".join(f"{value:.1f}" for value in load["before"])
    after = ", ".join(f"{value:.1f}" for value in load["after"])
    lines += [
        "",
        "Robustness index (PathoROB): same-class-other-lab share among each tile's k nearest tiles of other "
        "source images; paired (PLISM): the same tile found under another lab, the paired cosine beside the "
        "mean cosine of two different tiles (it means something only above that); lab-ID kNN: how often the "
        "majority of a tile's 5 nearest others is its own lab. `python benchmarks/run_robustness_table.py` "
        f"(`exaonepath-robustness --virtual_labs`), {record['date']}: robustness run "
        f"{seconds['robustness_run']:.0f} s wall (budget {BUDGET_SECONDS} s), {seconds['total']:.0f} s with tiling and training the demo model; "
        f"{machine_summary(record['machine'])}; load average {before} before, {after} after (1, 5, 15 min).",
    ]
    return "\n".join(lines) + "\n"


def run(work: Path, train_steps: int) -> dict:
    load_before = os.getloadavg()
    started = time.perf_counter()
    crc = labelled_crc_tiles(work / "crc")
    tiles, _ = tile_sample(work / "demo", num_workers=1)
    demo_model = pretrain_demo_model(tiles, work / "demo", train_steps)
    random_model = random_vit(demo_model, work / "random-vit", SEED)
    names = {
        f"random ViT (seed {SEED})": f"{random_model}: untrained, the demo model's architecture",
        f"demo DINO ViT ({train_steps} steps)": f"{demo_model}: exaonepath-demo's pretrain_demo_model",
    }
    settings = RobustnessSettings(
        models=(str(random_model), str(demo_model)),
        names=tuple(names),
        data=crc,
        virtual_labs=True,
        output_dir=work / "robustness",
        save_features=True,
        seed=SEED,
    )
    # a cache of its own: every feature is extracted in the timed run, none comes from an earlier one
    settings = replace(settings, extraction=replace(settings.extraction, cache_dir=work / "feature-cache"))
    models_built = time.perf_counter()
    outputs = run_robustness(settings)
    finished = time.perf_counter()
    run_record = json.loads((work / "robustness" / "run.json").read_text(encoding="utf-8"))
    return {
        "date": datetime.now(timezone.utc).date().isoformat(),
        "machine": machine_record("torch", "transformers"),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "seconds": {
            "models": round(models_built - started, 1),
            "robustness_run": round(finished - models_built, 1),
            "total": round(finished - started, 1),
        },
        "budget_seconds": BUDGET_SECONDS,
        "within_budget": finished - models_built <= BUDGET_SECONDS,
        "train_steps": train_steps,
        "models": names,
        "data": run_record["data"],
        "options": run_record["options"],
        "input_settings": run_record["input_settings"],
        "records": [
            {key: row[key] for key in ("model", "setting", "metrics", "reasons")} for row in outputs.records
        ],
        "environment": run_record["environment"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train_steps",
        type=int,
        default=DemoSettings().train_steps,
        help="DINO steps of the demo model (default: the demo's, %(default)s)",
    )
    parser.add_argument("--work_dir", type=Path, help="keep the run's outputs here (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="robustness-table-") as work:
            record = run(Path(work), args.train_steps)
    else:
        record = run(args.work_dir, args.train_steps)
    table = render_table(record)
    save_results(RESULTS_DIR, "robustness_table", record, table)
    print(table)


if __name__ == "__main__":
    main()
