"""Slide-level feature collapse: clustered features score high, mixed ones at chance (checked against
independent scikit-learn / numpy derivations), the t-SNE PNG is written, and both input settings run on
real multi-slide data."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from exaonepath_hf import ExaonePathConfig, ExaonePathModel
from exaonepath_hf.eval.backbones import Encoder
from exaonepath_hf.eval.feature_collapse import (
    CollapseInput,
    assess_collapse,
    between_group_variance_share,
    build_parser,
    collapse_metrics,
    knn_identity_accuracy,
    load_grouped_images,
    main,
    parquet_files,
    plot_tsne,
    tsne_embedding,
)
from exaonepath_hf.eval.features import cache_key, extract_features


def _slides(num_slides=6, per_slide=40, dim=32, spread=0.2, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_slides, dim))
    groups = np.repeat([f"slide{i}" for i in range(num_slides)], per_slide)
    features = np.repeat(centres, per_slide, axis=0) + spread * rng.normal(size=(len(groups), dim))
    return torch.tensor(features, dtype=torch.float32), groups


def test_clustered_by_slide_scores_high():
    features, groups = _slides()
    metrics = collapse_metrics(features, groups)
    assert metrics["knn_accuracy"] == 1.0
    assert metrics["silhouette"] > 0.8
    assert metrics["variance_between"] > 0.9
    assert metrics["knn_chance"] == pytest.approx(1 / 6)


def test_mixed_slides_score_at_chance():
    features, groups = _slides(num_slides=4, per_slide=300, dim=16)
    groups = np.random.default_rng(1).permutation(groups)  # slide identity unrelated to the features
    metrics = collapse_metrics(features, groups)
    assert metrics["knn_accuracy"] == pytest.approx(metrics["knn_chance"], abs=0.05)
    assert abs(metrics["silhouette"]) < 0.05
    assert metrics["variance_between"] == pytest.approx(metrics["variance_between_chance"], abs=0.01)


def test_one_nn_matches_sklearn_leave_one_out():
    features, groups = _slides(num_slides=5, per_slide=30, spread=1.5)
    neighbours = NearestNeighbors(n_neighbors=2, metric="cosine").fit(features.numpy())
    nearest_other = neighbours.kneighbors(features.numpy(), return_distance=False)[:, 1]
    expected = float(np.mean(groups[nearest_other] == groups))
    assert knn_identity_accuracy(features, groups, k=1, block=7) == pytest.approx(expected)


def test_variance_share_matches_a_direct_derivation():
    features, groups = _slides(num_slides=3, per_slide=10, spread=1.0)
    x = features.double().numpy()
    total = ((x - x.mean(0)) ** 2).sum()
    within = sum(((x[groups == g] - x[groups == g].mean(0)) ** 2).sum() for g in np.unique(groups))
    assert between_group_variance_share(features, groups) == pytest.approx(1 - within / total)


def test_singletons_are_left_out_and_one_group_is_an_error():
    features, groups = _slides(num_slides=3, per_slide=5)
    groups = groups.copy()
    groups[0] = "lonely"
    assert collapse_metrics(features, groups)["singletons_left_out"] == 1
    with pytest.raises(ValueError, match="at least 2 groups"):
        collapse_metrics(features[:5], groups[:5])


def test_tsne_png_is_written(tmp_path):
    features, groups = _slides(num_slides=3, per_slide=10)
    metrics = collapse_metrics(features, groups)
    panels = [
        {
            "model": m,
            "setting": s,
            "groups": list(groups),
            "embedding": tsne_embedding(features),
            "metrics": metrics,
        }
        for m in ("a", "b")
        for s in ("raw", "macenko")
    ]
    path = plot_tsne(panels, ["a", "b"], ["raw", "macenko"], tmp_path / "tsne.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 500 and image.height > 500


def test_grouping_layouts(shared_data):
    by_folder = load_grouped_images(shared_data / "tcga-tiles", "folder")
    groups = by_folder.dataset["slide_id"]
    assert groups.count("TCGA-3X-AAVA-01Z-00-DX1") == 6 and groups.count("TCGA-AD-6964-01Z-00-DX1") == 3
    tiled = load_grouped_images(shared_data / "stain-templates", "file", tile=224)
    assert tiled.dataset["slide_id"].count("template1") == 4 and len(set(tiled.dataset["slide_id"])) == 4
    assert (
        tiled.fingerprint
        != load_grouped_images(shared_data / "stain-templates", "file", tile=112).fingerprint
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


@pytest.mark.parametrize(
    ("folder", "group_by", "tile"), [("stain-templates", "file", 224), ("tcga-tiles", "folder", None)]
)
def test_cli_on_real_slides_both_settings_two_models(
    shared_data, tiny_models, tmp_path, folder, group_by, tile
):
    argv = [
        "--model", tiny_models[0], "--model", tiny_models[1], "--data", str(shared_data / folder),
        "--group_by", group_by, "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
        "--num_workers", "0", "--batch_size", "8",
    ] + (["--tile", str(tile)] if tile else [])  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "collapse.json").read_text())
    assert [(r["model"], r["setting"]) for r in summary["results"]] == [
        ("tiny0", "raw"), ("tiny0", "macenko"), ("tiny1", "raw"), ("tiny1", "macenko"),
    ]  # fmt: skip
    for result in summary["results"]:
        metrics = result["by_group"]
        assert 0.0 <= metrics["knn_accuracy"] <= 1.0 and -1.0 <= metrics["silhouette"] <= 1.0
        assert result["preprocessing"]["stain_normalize"] == (result["setting"] == "macenko")
    record = json.loads((tmp_path / "out" / "collapse.json").read_text())
    assert record["group_by"] == group_by
    with Image.open(tmp_path / "out" / "tsne.png") as image:
        assert image.format == "PNG"
    assert "| tiny1 | macenko |" in (tmp_path / "out" / "collapse.md").read_text()


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
        extracted = extract_features(encoder, data.dataset, preprocessing, key, tmp_path, num_workers=0)
        share[stain_normalize] = collapse_metrics(extracted.features, extracted.slide_ids)["variance_between"]
    # the two TCGA slides differ in stain: raw colour separates them, normalized colour hardly does
    assert share[False] > 0.3
    assert share[True] < share[False] / 5


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


@pytest.fixture
def tiling_output(tmp_path):
    """An exaonepath-tile output folder whose manifest lists two complete slides, beside the partial shard a run
    killed while publishing a third slide leaves."""
    out = tmp_path / "tiles"
    (out / "shards").mkdir(parents=True)
    manifest = {"slides": {}}
    for index, slide in enumerate(("slide-a", "slide-b")):
        _write_slide_shard(out / "shards" / f"{slide}-00000.parquet", slide, 3, index)
        manifest["slides"][slide] = {"shards": [f"{slide}-00000.parquet"]}
    _write_slide_shard(out / "shards" / "slide-c-00000.parquet", "slide-c", 2, 9)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_tiling_output_reads_only_the_manifests_complete_shards(tiling_output):
    for data in (tiling_output, tiling_output / "shards", f"{tiling_output}/shards/*.parquet"):
        groups = load_grouped_images(data, "slide_id").dataset["slide_id"]
        assert sorted(set(groups)) == ["slide-a", "slide-b"] and len(groups) == 6, data
    assert parquet_files(tiling_output) == [
        str(tiling_output / "shards" / name) for name in ("slide-a-00000.parquet", "slide-b-00000.parquet")
    ]
    # a parquet file or glob outside a tiling output is read as given
    alone = tiling_output.parent / "alone"
    alone.mkdir()
    _write_slide_shard(alone / "x.parquet", "slide-x", 2, 3)
    _write_slide_shard(alone / "y.parquet", "slide-y", 2, 4)
    assert load_grouped_images(alone / "x.parquet", "slide_id").dataset["slide_id"] == ["slide-x"] * 2
    assert len(load_grouped_images(f"{alone}/*.parquet", "slide_id").dataset) == 4
    assert parquet_files(alone) is None


def test_assess_collapse_assembles_results_and_figure(tmp_path):
    features, groups = _slides(num_slides=3, per_slide=10)
    inputs = [
        CollapseInput("m", "raw", features, list(groups), details={"note": 1}),
        CollapseInput("m", "macenko", features, list(groups), classes=["a", "b"] * 15),
    ]
    results, png = assess_collapse(inputs, tmp_path / "t.png")
    assert [(r["model"], r["setting"]) for r in results] == [("m", "raw"), ("m", "macenko")]
    assert results[0]["note"] == 1 and "by_class" not in results[0] and "by_class" in results[1]
    assert results[0]["by_group"] == collapse_metrics(features, groups)
    assert png == tmp_path / "t.png" and png.is_file()


def test_cli_flags_take_underscores_and_keep_the_dashed_alias():
    parser = build_parser()
    for flag in ("--group_by", "--group-by"):
        assert parser.parse_args(["--model", "m", "--data", "d", flag, "file"]).group_by == "file"


def test_cli_reports_bad_input_with_an_exit_code(tmp_path, capsys):
    code = main(["--model", "m", "--data", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    assert code == 2 and "neither a folder of images nor parquet shards" in capsys.readouterr().err
