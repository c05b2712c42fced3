"""exaonepath-robustness end to end on tiny checkpoints and real H&E: the virtual-labs protocol on
crc-val-he-7k-samples, the JSON record format, null metrics with their reasons, the numbers recomputed from the
saved features by an explicit loop, the PathoROB and PLISM tasks on local stand-ins with the hub columns, and the
data layouts of the earlier feature-collapse module."""

import csv
import io
import json
import math
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from exaonepath_hf import ExaonePathConfig, ExaonePathModel
from exaonepath_hf.eval.common.encoders import Encoder
from exaonepath_hf.eval.common.extraction import ForwardSettings
from exaonepath_hf.eval.common.features import cache_key, extract_features
from exaonepath_hf.eval.robustness.cli import build_robustness_parser, robustness_main
from exaonepath_hf.eval.robustness.grouped_images import load_grouped_images, parquet_files
from exaonepath_hf.eval.robustness.measures import MetricOptions
from exaonepath_hf.eval.robustness.metrics import between_group_variance_share, paired_retrieval
from exaonepath_hf.eval.robustness.protocol import (
    REINHARD_TEMPLATE_STATISTICS,
    labelled_images,
    virtual_labs_for,
)
from exaonepath_hf.eval.robustness.report import RobustnessInput, assess_robustness
from exaonepath_hf.eval.robustness.samples import SampleTable, load_robustness_samples
from exaonepath_hf.eval.robustness.tasks import get_robustness_task, load_robustness_task

REQUIRED_METRICS = (
    "robustness_index",
    "robustness_index_k",
    "robustness_index_ci",
    "clustering_score",
    "paired_cosine",
    "paired_top1",
    "paired_top10",
    "within_cross_gap",
    "same_slide_share",
    "slide_identity_knn",
    "variance_between_centers",
)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = root / f"tiny{seed}"
        ExaonePathModel(
            ExaonePathConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
        ).save_pretrained(path)
        paths.append(str(path))
    return paths


def crc_sources(shared_data, per_class):
    """(name, RGB, class, case) of CRC-VAL-HE-7K samples; the class is the file-name prefix."""
    sources = []
    for path in sorted((shared_data / "crc-val-he-7k-samples").glob("*.png")):
        label = path.name.split("-")[0]
        if sum(source[2] == label for source in sources) < per_class:
            sources.append((path.stem, np.array(Image.open(path).convert("RGB")), label, path.stem))
    return sources


def copy_crc_by_class(shared_data, folder, per_class):
    """CRC-VAL-HE-7K samples in class subfolders (the class is the file-name prefix)."""
    for name, _, label, _ in crc_sources(shared_data, per_class):
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / f"{name}.png").write_bytes(
            (shared_data / "crc-val-he-7k-samples" / f"{name}.png").read_bytes()
        )
    return folder


@pytest.fixture(scope="module")
def cli_run(shared_data, tiny_models, tmp_path_factory):
    """Two tiny models over the virtual-labs protocol: 16 real CRC tiles (2 per class) x 5 labs = 80 images."""
    out = tmp_path_factory.mktemp("robustness")
    source = copy_crc_by_class(shared_data, out / "crc", per_class=2)
    argv = [
        "--model", tiny_models[0], "--model", tiny_models[1], "--data", str(source), "--virtual_labs",
        "--output_dir", str(out / "out"), "--cache_dir", str(out / "cache"), "--num_workers", "0",
        "--batch_size", "40", "--save_features", "--bootstrap", "200", "--restarts", "2",
    ]  # fmt: skip
    assert robustness_main(argv) == 0
    return out / "out"


def _is_number(value):
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_json_records_have_the_issue_format(cli_run):
    records = json.loads((cli_run / "robustness.json").read_text())
    assert [(r["model"], r["setting"]) for r in records] == [
        ("tiny0", "raw"), ("tiny0", "macenko"), ("tiny1", "raw"), ("tiny1", "macenko"),
    ]  # fmt: skip
    for record in records:
        metrics, reasons = record["metrics"], record["reasons"]
        assert set(REQUIRED_METRICS) <= set(metrics)
        for name, value in metrics.items():
            if value is None:
                assert reasons[name], name  # every null carries its reason
            elif name == "robustness_index_ci":
                low, high = value
                assert low <= metrics["robustness_index"] <= high
            else:
                assert _is_number(value), (name, value)
        assert set(reasons) == {name for name, value in metrics.items() if value is None}
        assert 0 <= metrics["robustness_index"] <= 1 and metrics["robustness_index_k"] == 11
        assert 0 <= metrics["paired_top1"] <= metrics["paired_top10"] <= 1
        assert metrics["paired_num_pairs"] == 16
        # each lab re-stains the same tiles: leave-one-lab-out would find a query's own re-stainings
        assert metrics["within_cross_gap"] is None and "spans several slides" in reasons["within_cross_gap"]
        assert record["details"]["preprocessing"]["stain_normalize"] == (record["setting"] == "macenko")
        assert record["results"]["robustness_index"]["so"] + record["results"]["robustness_index"]["os"] > 0


def _explicit_robustness_index(features, labels, centers, cases, k):
    """PathoROB's RI by explicit loops: per query, the k most cosine-similar samples of other cases."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    so = os_ = 0
    for query in range(len(unit)):
        candidates = [j for j in range(len(unit)) if cases[j] != cases[query]]
        similarity = [float(unit[query] @ unit[j]) for j in candidates]
        for position in np.argsort(similarity)[::-1][:k]:
            j = candidates[position]
            same_label, same_center = labels[j] == labels[query], centers[j] == centers[query]
            so += same_label and not same_center
            os_ += same_center and not same_label
    return so / (so + os_)


def test_saved_features_recompute_the_json(cli_run):
    records = json.loads((cli_run / "robustness.json").read_text())
    tensors = load_file(str(cli_run / "features.safetensors"))
    text = (cli_run / "samples.csv").read_text()
    assert text.splitlines()[0] == "file_name,label,center,case_id,pair_id,slide_id"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 80 and {row["center"] for row in rows} == {lab.name for lab in virtual_labs_for()}
    column = {name: [row[name] for row in rows] for name in rows[0]}
    assert sorted(tensors) == ["tiny0/macenko", "tiny0/raw", "tiny1/macenko", "tiny1/raw"]
    for record in records:
        features = tensors[f"{record['model']}/{record['setting']}"]
        assert features.shape == (80, 64)
        expected = _explicit_robustness_index(
            features.double().numpy(), column["label"], column["center"], column["case_id"], k=11
        )
        assert record["metrics"]["robustness_index"] == pytest.approx(expected, abs=1e-12)
        paired = paired_retrieval(features, column["pair_id"], column["center"])
        assert record["metrics"]["paired_top10"] == pytest.approx(paired.top10)
        assert record["metrics"]["variance_between_centers"] == pytest.approx(
            between_group_variance_share(features, column["center"])
        )


def test_macenko_brings_the_labs_closer_but_does_not_undo_them(cli_run):
    """The protocol is not circular: Macenko input pulls a tile's re-stainings together, yet a random encoder
    still cannot retrieve them perfectly (a Macenko re-staining would be undone exactly)."""
    metrics = {
        (r["model"], r["setting"]): r["metrics"]
        for r in json.loads((cli_run / "robustness.json").read_text())
    }
    for model in ("tiny0", "tiny1"):
        raw, macenko = metrics[model, "raw"], metrics[model, "macenko"]
        assert macenko["paired_cosine"] > raw["paired_cosine"]
        assert macenko["variance_between_centers"] < raw["variance_between_centers"]
        assert macenko["paired_top1"] < 0.9


def test_report_table_and_tsne_pngs(cli_run):
    markdown = (cli_run / "robustness.md").read_text()
    assert "| tiny1 | macenko |" in markdown and "## Null metrics" in markdown
    assert "`within_cross_gap` (all runs): a case spans several slides" in markdown
    assert "Virtual labs: every labelled source image re-stained once per lab" in markdown
    for name in ("tsne_by_center.png", "tsne_by_class.png"):
        with Image.open(cli_run / name) as image:
            assert image.format == "PNG" and image.width > 500 and image.height > 500


def _synthetic_table(n_per_center=12, centers=("A", "B", "C")):
    n = n_per_center * len(centers)
    return SampleTable(
        file_name=tuple(f"f{i}" for i in range(n)),
        case_id=tuple(f"case{i // 2}" for i in range(n)),
        slide_id=tuple(f"slide{i // 4}" for i in range(n)),
        center=tuple(np.repeat(centers, n_per_center)),
    )


def test_null_metrics_carry_their_reason_into_json_and_markdown(tmp_path):
    table = _synthetic_table()
    features = torch.randn(len(table), 8, generator=torch.Generator().manual_seed(0))
    outputs = assess_robustness(
        [RobustnessInput("m", "raw", features, table)], tmp_path, MetricOptions(bootstrap=0), notes=["a note"]
    )
    record = json.loads(outputs.json.read_text())[0]
    metrics, reasons = record["metrics"], record["reasons"]
    for name in ("robustness_index", "clustering_score", "within_cross_gap"):
        assert metrics[name] is None and "biological class labels" in reasons[name]
    for name in ("paired_cosine", "paired_top1", "paired_top10"):
        assert metrics[name] is None and "no pairs" in reasons[name]
    slides = np.array(table.slide_id)
    assert metrics["slide_identity_chance"] == pytest.approx(
        sum((slides == s).mean() ** 2 for s in set(slides))
    )
    assert metrics["variance_between_centers"] == pytest.approx(
        between_group_variance_share(features, table.center)
    )
    assert _is_number(metrics["same_slide_share"]) and _is_number(metrics["silhouette_by_slide"])
    markdown = outputs.markdown.read_text()
    assert "- `robustness_index` (all runs): the data has no biological class labels" in markdown
    assert "- a note" in markdown
    assert [p.name for p in outputs.tsne] == ["tsne_by_center.png"]  # no classes: no class-coloured plot


def test_save_features_needs_one_sample_order(tmp_path):
    table = _synthetic_table()
    features = torch.randn(len(table), 4)
    inputs = [
        RobustnessInput("m", "raw", features, table),
        RobustnessInput("m", "macenko", features.flip(0), table.select(list(range(len(table)))[::-1])),
    ]
    with pytest.raises(ValueError, match="same samples in the same order"):
        assess_robustness(inputs, tmp_path, MetricOptions(bootstrap=0), save_features=True)


def _folder(tmp_path, shared_data, header, rows):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for path in sorted((shared_data / "crc-val-he-7k-samples").glob("*.png"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    names = sorted(p.name for p in folder.glob("*.png"))
    lines = [",".join(header)] + [",".join(rows(name)) for name in names]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        (("file_name", "label", "slide_id"), "'center'"),
        (("file_name", "center", "case_id"), "'label'"),
        (("file_name", "label", "center"), "neither a 'case_id' nor a 'slide_id'"),
    ],
)
def test_missing_column_is_named_with_its_file(tmp_path, shared_data, capsys, header, missing):
    folder = _folder(tmp_path, shared_data, header, lambda name: [name] + ["x"] * (len(header) - 1))
    code = robustness_main(
        ["--model", "unused", "--data", str(folder), "--output_dir", str(tmp_path / "out")]
    )
    error = capsys.readouterr().err
    assert code == 2 and missing in error and str(folder / "metadata.csv") in error


def test_a_relative_folder_with_every_column(tmp_path, shared_data, monkeypatch):
    folder = _folder(
        tmp_path,
        shared_data,
        ("file_name", "label", "center", "slide_id", "pair_id"),
        lambda name: [name, name[:3], "lab-a", "s1", name],
    )
    monkeypatch.chdir(folder.parent)
    samples = load_robustness_samples(folder.name)
    table = samples.table
    assert table.file_name == tuple(sorted(p.name for p in folder.glob("*.png")))
    assert (
        table.label == ("ADI", "ADI") and table.center == ("lab-a",) * 2 and table.pair_id == table.file_name
    )
    assert table.case_id == table.slide_id == ("s1", "s1")
    assert samples.dataset.column_names == ["image", "label", "slide_id", "patient_id"]


def _png(rgb):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def pathorob_standin(tmp_path, shared_data):
    """A local copy laid out like the hub repo (data/train-00000-of-00001.parquet) with PathoROB's columns,
    real CRC tiles as images: 2 in-domain centres x 2 slides x 2 classes x 2 patches, plus one OOD centre."""
    tiles = [
        np.array(Image.open(p).convert("RGB"))
        for p in sorted((shared_data / "crc-val-he-7k-samples").glob("*.png"))
    ]
    columns = {
        name: [] for name in ("image", "subset", "slide_id", "patch_id", "biological_class", "medical_center")
    }
    index = 0
    for center, subset in (("RUMC", "ID"), ("UMCU", "ID"), ("LPON", "OOD")):
        for slide in range(2):
            for label in ("normal", "tumor"):
                for _ in range(2):
                    columns["image"].append({"bytes": _png(tiles[index % len(tiles)]), "path": None})
                    columns["subset"].append(subset)
                    columns["slide_id"].append(f"{center.lower()}_{slide}")
                    columns["patch_id"].append(str(1000 + index))
                    columns["biological_class"].append(label)
                    columns["medical_center"].append(center)
                    index += 1
    features = datasets.Features(
        {"image": datasets.Image(), **{name: datasets.Value("string") for name in columns if name != "image"}}
    )
    root = tmp_path / "PathoROB-camelyon"
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(
        str(root / "data" / "train-00000-of-00001.parquet")
    )
    return root


def test_pathorob_standin_loads_through_the_task(pathorob_standin):
    samples = load_robustness_samples(pathorob_standin, task="pathorob-camelyon")
    table = samples.table
    assert len(table) == 16 and set(table.center) == {"RUMC", "UMCU"}  # OOD rows left out, as PathoROB does
    assert set(table.label) == {"normal", "tumor"} and table.case_id == table.slide_id
    assert table.pair_id is None and samples.provenance["excluded"]["subset"]["rows"] == 8
    assert samples.dataset.column_names == ["image", "label", "slide_id", "patient_id"]
    assert get_robustness_task("pathorob-camelyon").k == 11


def test_cli_on_the_pathorob_standin(pathorob_standin, tiny_models, tmp_path):
    argv = [
        "--model", tiny_models[0], "--task", "pathorob-camelyon", "--data", str(pathorob_standin),
        "--stain_normalization", "off", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
        "--num_workers", "0", "--bootstrap", "0", "--restarts", "1",
    ]  # fmt: skip
    assert robustness_main(argv) == 0
    (record,) = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert record["metrics"]["robustness_index_k"] == 11 and _is_number(record["metrics"]["robustness_index"])
    assert record["metrics"]["paired_top10"] is None and "no pairs" in record["reasons"]["paired_top10"]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["data"]["task"] == "pathorob-camelyon" and run["data"]["counts"]["centers"] == 2


def test_a_standin_without_the_hub_columns_is_refused(tmp_path):
    root = tmp_path / "copy"
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(np.zeros((8, 8, 3), np.uint8)), "path": None}], "slide_id": ["s"]},
        features=datasets.Features({"image": datasets.Image(), "slide_id": datasets.Value("string")}),
    ).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['biological_class', 'medical_center'\]"):
        load_robustness_task(get_robustness_task("pathorob-camelyon"), data_dir=root)


def test_plism_standin_pairs_tiles_by_location(tmp_path):
    """PLISM's hub rows are {slide_id, tile_id, png}; the tile id ends in the location shared by every slide."""
    rows = {"png": [], "slide_id": [], "tile_id": []}
    for slide in ("GIV_AT2_to_GMH_S60.tif", "HR_P_to_GMH_S60.tif"):
        for index, (x, y) in enumerate(((0, 0), (224, 0), (0, 224))):
            rows["png"].append({"bytes": _png(np.full((8, 8, 3), 40 * index, np.uint8)), "path": None})
            rows["slide_id"].append(slide)
            rows["tile_id"].append(f"{index}_16_{x}_{y}")
    path = tmp_path / "plism.parquet"
    datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "png": datasets.Image(),
                "slide_id": datasets.Value("string"),
                "tile_id": datasets.Value("string"),
            }
        ),
    ).to_parquet(str(path))
    loaded = load_robustness_task(get_robustness_task("plism"), data_dir=path)
    assert loaded.dataset["pair_id"][:3] == ["16_0_0", "16_224_0", "16_0_224"]
    assert loaded.dataset["center"] == rows["slide_id"] and set(loaded.dataset["label"]) == {""}
    samples = load_robustness_samples(path, task="plism")
    assert samples.table.label is None and samples.table.pair_id == tuple(loaded.dataset["pair_id"])


def test_packaged_reinhard_labs_match_a_fit_on_the_templates(shared_data):
    packaged, fitted = virtual_labs_for(), virtual_labs_for(shared_data)
    assert [lab.name for lab in packaged] == [lab.name for lab in fitted]
    assert packaged[0].name == "as-scanned" and packaged[:3] == fitted[:3]
    for lab, fit in zip(packaged[3:], fitted[3:], strict=True):
        assert REINHARD_TEMPLATE_STATISTICS[lab.name] == (lab.target_mean, lab.target_std)
        np.testing.assert_allclose(lab.target_mean, fit.target_mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(lab.target_std, fit.target_std, rtol=1e-5, atol=1e-7)


def test_labelled_images_from_class_subfolders(tmp_path, shared_data):
    for path in sorted((shared_data / "crc-val-he-7k-samples").glob("*.png"))[:6]:
        (tmp_path / "classes" / path.name.split("-")[0]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "classes" / path.name.split("-")[0] / path.name).write_bytes(path.read_bytes())
    images = labelled_images(tmp_path / "classes")
    assert [(name.split("__")[0], label) for name, _, label, _ in images] == [("ADI", "ADI")] * 4 + [
        ("DEB", "DEB")
    ] * 2
    assert images[0][1].shape == (224, 224, 3) and images[0][3] == images[0][0]
    (tmp_path / "classes" / "loose.png").write_bytes(
        (shared_data / "crc-val-he-7k-samples" / "ADI-TCGA-EENSRDNW.png").read_bytes()
    )
    with pytest.raises(ValueError, match="outside a class subfolder"):
        labelled_images(tmp_path / "classes")


def test_virtual_labs_folder_and_virtual_slides(cli_run):
    metadata = (cli_run / "virtual-labs" / "metadata.csv").read_text().splitlines()
    assert metadata[0] == "file_name,label,center,case_id,pair_id" and len(metadata) == 1 + 16 * 5
    run = json.loads((cli_run / "run.json").read_text())
    assert [lab["name"] for lab in run["data"]["virtual_labs"]] == [lab.name for lab in virtual_labs_for()]
    assert run["data"]["counts"] == {
        "samples": 80, "classes": 8, "centers": 5, "cases": 16, "slides": 5, "paired_samples": 80,
    }  # fmt: skip
    # each lab's copy is one virtual slide: the slide-level measures ask for the lab (chance 1/5)
    for record in json.loads((cli_run / "robustness.json").read_text()):
        assert record["metrics"]["slide_identity_chance"] == pytest.approx(0.2)
        assert record["metrics"]["variance_between_slides"] == record["metrics"]["variance_between_centers"]


# --- data layouts, moved over from the feature-collapse tests


def test_grouping_layouts(shared_data):
    by_folder = load_grouped_images(shared_data / "tcga-tiles", "folder")
    groups = by_folder.dataset["slide_id"]
    assert groups.count("TCGA-3X-AAVA-01Z-00-DX1") == 6 and groups.count("TCGA-AD-6964-01Z-00-DX1") == 3
    tiled = load_grouped_images(shared_data / "stain-templates", "file", tile=224)
    assert tiled.dataset["slide_id"].count("template1") == 4 and len(set(tiled.dataset["slide_id"])) == 4
    assert tiled.file_names[0] == "template1.png#tile0" and len(tiled.file_names) == len(tiled.dataset)
    assert (
        tiled.fingerprint
        != load_grouped_images(shared_data / "stain-templates", "file", tile=112).fingerprint
    )


def _write_slide_shard(path, slide_id, num_patches, seed):
    from exaonepath_hf.tiling.shards import PatchRecord, encode_patch, write_shard

    rng = np.random.default_rng(seed)
    records = [
        PatchRecord(
            image=encode_patch(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
            slide_id=slide_id,
            x=i * 32,
            y=0,
            level=0,
            size=32,
            mpp=0.5,
            tissue_fraction=1.0,
        )  # fmt: skip
        for i in range(num_patches)
    ]
    write_shard(path, records, row_group_size=8)


def test_tiling_output_reads_only_the_manifests_complete_shards(tmp_path):
    out = tmp_path / "tiles"
    (out / "shards").mkdir(parents=True)
    manifest = {"slides": {}}
    for index, slide in enumerate(("slide-a", "slide-b")):
        _write_slide_shard(out / "shards" / f"{slide}-00000.parquet", slide, 3, index)
        manifest["slides"][slide] = {"shards": [f"{slide}-00000.parquet"]}
    _write_slide_shard(
        out / "shards" / "slide-c-00000.parquet", "slide-c", 2, 9
    )  # a killed run's partial shard
    (out / "manifest.json").write_text(json.dumps(manifest))
    for data in (out, out / "shards", f"{out}/shards/*.parquet"):
        grouped = load_grouped_images(data, "slide_id")
        assert (
            sorted(set(grouped.dataset["slide_id"])) == ["slide-a", "slide-b"] and len(grouped.dataset) == 6
        )
        assert {"x", "y", "mpp"} <= set(grouped.columns) and grouped.columns["x"][:3] == ["0", "32", "64"]
    assert parquet_files(out) == [str(out / "shards" / f"{s}-00000.parquet") for s in ("slide-a", "slide-b")]
    # shards carry no class or centre: the robustness table has neither, and the measures that need them are null
    table = load_robustness_samples(out).table
    assert table.label is None and table.center is None and table.case_id == table.slide_id
    alone = tmp_path / "alone"
    alone.mkdir()
    _write_slide_shard(alone / "x.parquet", "slide-x", 2, 3)
    assert load_grouped_images(alone / "x.parquet", "slide_id").dataset["slide_id"] == ["slide-x"] * 2
    assert parquet_files(alone) is None


class _ColourStatistics(torch.nn.Module):
    """Per-channel mean and std of the input: a feature that only sees stain, for a known-answer check."""

    def forward(self, pixel_values):
        stats = torch.cat([pixel_values.mean((2, 3)), pixel_values.std((2, 3))], dim=1)
        return SimpleNamespace(last_hidden_state=stats[:, None, :])


def test_macenko_removes_stain_driven_slide_identity(shared_data, tmp_path):
    encoder = Encoder(
        model=_ColourStatistics(), source="colour-statistics", revision="1", kind="transformers", pooling="cls",
        feature_dim=6,
    )  # fmt: skip
    data = load_grouped_images(shared_data / "tcga-tiles", "folder")
    share = {}
    for stain_normalize in (False, True):
        preprocessing = encoder.default_preprocessing(stain_normalize=stain_normalize)
        key = cache_key(encoder, data.source, "local", data.fingerprint, "all", preprocessing, "fp32")
        extracted = extract_features(
            encoder,
            data.dataset,
            preprocessing,
            key,
            tmp_path,
            ForwardSettings(num_workers=0, progress=False),
        )
        keep = [i for i, s in enumerate(extracted.slide_ids) if s.startswith("TCGA")]
        share[stain_normalize] = between_group_variance_share(
            extracted.features[keep], [extracted.slide_ids[i] for i in keep]
        )
    # the two TCGA slides differ in stain: raw colour separates them, normalized colour hardly does
    assert share[False] > 0.3
    assert share[True] < share[False] / 5


def test_cli_flags_take_underscores():
    args = build_robustness_parser().parse_args(
        ["--model", "m", "--data", "d", "--output_dir", "o", "--save_features", "--virtual_labs", "--k", "7"]
    )
    assert args.save_features and args.virtual_labs and args.k == 7 and args.batch_size == 64


def test_cli_reports_bad_input_with_an_exit_code(tmp_path, capsys):
    code = robustness_main(
        ["--model", "m", "--data", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")]
    )
    assert code == 2 and "neither a folder, parquet shards nor a registered task" in capsys.readouterr().err
    code = robustness_main(
        ["--model", "m", "--model", "x/m", "--data", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    )
    assert code == 2 and "share a name" in capsys.readouterr().err
