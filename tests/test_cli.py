"""What every command shares: one flag vocabulary (`--output_dir` with `--out` as its alias, `--quiet`,
`--stain_normalization on|off`), one log format for ours and the Hugging Face libraries' lines, progress that
stays readable in a log file, and a wrong `--model` answered in one line instead of minutes of hub retries."""

import logging
import time
from pathlib import Path

import pytest
from conftest import SAMPLE_SLIDE

from exaonepath_hf import convert_cli, demo_cli, fit_stain_cli
from exaonepath_hf.cli import LOG_FORMAT, configure_output
from exaonepath_hf.eval.patch import cli as patch_cli
from exaonepath_hf.eval.robustness import cli as robustness_cli
from exaonepath_hf.eval.slide import cli as slide_cli
from exaonepath_hf.progress import progress_bar
from exaonepath_hf.tiling import cli as tiling_cli
from exaonepath_hf.train import pretrain_dino

# each command's parser with the arguments it requires besides its output folder
COMMANDS = {
    "exaonepath-convert": (convert_cli.build_parser, ["EXAONEPath.ckpt"]),
    "exaonepath-fit-stain": (fit_stain_cli.build_parser, ["target.png"]),
    "exaonepath-demo": (demo_cli.build_parser, []),
    "exaonepath-tile": (tiling_cli.build_parser, ["slide.svs"]),
    "exaonepath-probe": (patch_cli.build_probe_parser, ["--model", "m", "--task", "crc100k"]),
    "exaonepath-report": (patch_cli.build_report_parser, ["results"]),
    "exaonepath-convert-dataset": (patch_cli.build_convert_dataset_parser, ["mhist", "src"]),
    "exaonepath-robustness": (robustness_cli.build_robustness_parser, ["--model", "m", "--task", "plism"]),
    "exaonepath-extract": (slide_cli.build_extract_parser, ["tiles", "--model", "m"]),
    "exaonepath-slide-probe": (slide_cli.build_slide_probe_parser, ["--features", "f", "--labels", "l.csv"]),
    "exaonepath-pretrain": (pretrain_dino.build_parser, ["--config", "cpu_smoke"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_output_dir_with_out_as_alias_and_quiet(command):
    build_parser, required = COMMANDS[command]
    by_name = build_parser().parse_args([*required, "--output_dir", "here", "--quiet"])
    by_alias = build_parser().parse_args([*required, "--out", "here"])
    assert by_name.output_dir == by_alias.output_dir == Path("here")
    assert by_name.quiet and not by_alias.quiet


def test_stain_normalization_is_switched_the_same_way_everywhere(capsys):
    probe = patch_cli.build_probe_parser().parse_args(["--model", "m", "--task", "pcam"])
    extract = slide_cli.build_extract_parser().parse_args(
        ["t", "--model", "m", "--out", "o", "--stain_normalization", "off"]
    )
    assert probe.stain_normalization == "on" and extract.stain_normalization == "off"
    robustness = robustness_cli.build_robustness_parser()
    both = robustness.parse_args(["--model", "m", "--task", "plism"])
    raw_only = robustness.parse_args(["--model", "m", "--task", "plism", "--stain_normalization", "off"])
    as_settings = [robustness_cli.INPUT_SETTING_OF_SWITCH[s] for s in both.stain_normalization]
    assert as_settings == ["raw", "macenko"] and raw_only.stain_normalization == ["off"]
    for retired in (["--no_stain_normalization"], ["--stain_normalize", "off"], ["--settings", "raw"]):
        with pytest.raises(SystemExit):
            slide_cli.build_extract_parser().parse_args(["t", "--model", "m", "--out", "o", *retired])
    capsys.readouterr()


# ------------------------------------------------------------------------------------------ a wrong --model


def _one_line_error(capsys, code: int, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"{command}: error: "), err
    return err


def test_a_hub_id_offline_is_one_line(tmp_path, capsys):
    code = slide_cli.extract_main(
        [str(SAMPLE_SLIDE), "--model", "no-org/no-model", "--out", str(tmp_path / "o")]
    )
    err = _one_line_error(capsys, code, "exaonepath-extract")
    assert "no-org/no-model" in err and "HF_HUB_OFFLINE" in err


def test_an_unreachable_hub_is_one_line_without_retries(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.perf_counter()
    code = slide_cli.extract_main(
        [str(SAMPLE_SLIDE), "--model", "no-org/no-model", "--out", str(tmp_path / "o")]
    )
    err = _one_line_error(capsys, code, "exaonepath-extract")
    assert "cannot be reached" in err and time.perf_counter() - started < 20


def test_a_missing_local_model_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "models" / "not-there"
    code = slide_cli.extract_main([str(SAMPLE_SLIDE), "--model", str(missing), "--out", str(tmp_path / "o")])
    assert "no such file or folder" in _one_line_error(capsys, code, "exaonepath-extract")


# ------------------------------------------------------------------------------------- logs and progress


def test_the_hugging_face_libraries_log_in_our_format(caplog):
    configure_output(libraries=("transformers", "datasets"))
    for library in ("transformers", "datasets"):
        assert logging.getLogger(library).handlers == [] and logging.getLogger(library).propagate
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.modeling_utils").warning("from transformers")
        logging.getLogger("datasets.builder").warning("from datasets")
    assert [r.getMessage() for r in caplog.records] == ["from transformers", "from datasets"]
    assert "%(asctime)s" in LOG_FORMAT and "%(name)s" in LOG_FORMAT


def test_progress_in_a_log_file_is_lines_without_control_codes(caplog, capfd, monkeypatch):
    monkeypatch.setattr("exaonepath_hf.progress.LOG_INTERVAL_S", 0)
    with caplog.at_level(logging.INFO):
        with progress_bar(total=2, desc="outer", unit="slide") as outer:
            for _ in range(2):
                with progress_bar(total=3, desc="inner", leave=False) as inner:
                    inner.update(3)
                outer.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["inner", "outer", "inner", "outer"]
    assert lines[-1].startswith("outer: 100%") and "2/2" in lines[-1]
    captured = capfd.readouterr()
    assert "\r" not in captured.err + captured.out and "\x1b" not in captured.err


def test_quiet_means_no_progress_at_all(caplog, capfd):
    with caplog.at_level(logging.WARNING):
        with progress_bar(total=2, desc="work") as bar:
            bar.update(2)
    assert caplog.records == [] and capfd.readouterr().err == ""


def test_quiet_extraction_prints_nothing_but_its_summary(tiny_model_dir, tmp_path, capfd):
    code = slide_cli.extract_main(
        [str(SAMPLE_SLIDE), "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "f"), "--quiet"]
    )
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert captured.err == "", captured.err  # no "Loading weights" bar, no info lines
    assert captured.out.startswith("1 slides extracted")


def test_local_files_load_without_download_bars(shared_data, tmp_path, capfd):
    from exaonepath_hf.eval.common.data import load_local_dataset

    loaded = load_local_dataset(
        "imagefolder", data_dir=str(shared_data / "crc-val-he-7k-samples"), cache_dir=str(tmp_path)
    )
    assert loaded["train"].num_rows == len(list((shared_data / "crc-val-he-7k-samples").glob("*.png")))
    assert "Downloading data" not in capfd.readouterr().err
