"""The package as users and maintainers meet it: installed names, light imports, entry points, silent loading.

- A wheel holds only `exaonepath_hf` at the top level, and installed into a fresh virtual environment its
  console scripts and `accelerate launch -m` run from an empty folder.
- `import exaonepath_hf` registers the Auto classes whatever the import order, without importing torch itself;
  tiling (its CLI and its worker processes) never imports torch or transformers.
- Every console script answers `--help` and argument errors without importing torch (its parser is built by a
  light module), and every long option has the underscore spelling.
- The README's loading calls never ask whether to run remote code.
"""

import configparser
import os
import re
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, SAMPLE_SLIDE

REMOTE_CODE_PROMPT = "Do you wish to run the custom code"


def console_scripts() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(PROJECT_ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=", 1) for line in lines)


def run_python(code: str, cwd: Path, python: str = sys.executable, timeout: float = 600) -> str:
    """Runs `code` in a fresh interpreter with no standard input; returns stdout + stderr, fails on error."""
    result = subprocess.run(
        [python, "-c", textwrap.dedent(code)],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


# ---------------------------------------------------------------- installed names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            out,
            ".",
        ],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("exaonepath_hf-*.whl")
    return path


def test_wheel_holds_only_the_package_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "exaonepath_hf",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    for expected in (
        "exaonepath_hf/train/pretrain_dino.py",
        "exaonepath_hf/train/configs/cpu_smoke.yaml",
        "exaonepath_hf/eval/patch/linear_probe.py",
        "exaonepath_hf/eval/common/metrics/pathology_metrics.py",
        "exaonepath_hf/data/CMU-1-Small-Region.svs",
    ):
        assert expected in names


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_its_commands_from_an_empty_folder(wheel, tmp_path):
    """The wheel's own files only: dependencies come from this environment through a .pth file, so the test
    needs no index; the editable install's finder is not loaded there (it is a .pth of this site only)."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path, str(python))
    dependencies = run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path)
    Path(site.strip(), "dependencies.pth").write_text(dependencies.strip() + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}"}

    def run(*command: str, timeout: float = 600) -> str:
        result = subprocess.run(
            command,
            cwd=empty,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr

    where = run(str(python), "-c", "import exaonepath_hf.train as t; print(t.__file__)")
    assert where.strip().startswith(site.strip()), where
    assert "usage: exaonepath-pretrain" in run("exaonepath-pretrain", "--help")
    assert "usage: exaonepath-probe" in run("exaonepath-probe", "--help")
    run("exaonepath-tile", str(SAMPLE_SLIDE), "--out", "tiles", "--quiet")
    run(
        str(python), "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "exaonepath_hf.train.pretrain_dino", "--config", "cpu_smoke",
        "data.source=tiles", "run.output_dir=runs/smoke", "run.max_steps=2",
    )  # fmt: skip
    assert (empty / "runs" / "smoke" / "export" / "config.json").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- light imports, Auto registration

HEAVY = ("torch", "torchvision", "transformers")


def test_package_root_and_tiling_import_neither_torch_nor_transformers(tmp_path):
    output = run_python(
        f"""
        import sys
        import exaonepath_hf
        import exaonepath_hf.tiling.cli
        from exaonepath_hf.tiling import load_patch_dataset, tile_slides
        print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
        """,
        tmp_path,
    )
    assert output.strip().splitlines()[-1] == "[]"


def test_tiling_workers_import_neither_torch_nor_transformers(tmp_path):
    """Tile two slides with two worker processes, then ask a process of the same kind what it imported."""
    (tmp_path / "slides").mkdir()
    for name in ("a", "b"):
        (tmp_path / "slides" / f"{name}.svs").symlink_to(SAMPLE_SLIDE)
    (tmp_path / "probe.py").write_text(
        "import sys\n\n\ndef heavy_modules():\n"
        f"    return sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
    )
    output = run_python(
        """
        import sys
        from concurrent.futures import ProcessPoolExecutor
        from exaonepath_hf.tiling import TilingConfig, tile_slides
        from exaonepath_hf.tiling.pipeline import worker_process_context
        import probe

        if __name__ == "__main__":
            summary = tile_slides(["slides/a.svs", "slides/b.svs"], "tiles", TilingConfig(), num_workers=2)
            assert len(summary.tiled) == 2, summary
            with ProcessPoolExecutor(1, mp_context=worker_process_context()) as pool:
                print("worker", pool.submit(probe.heavy_modules).result())
            print("main", probe.heavy_modules())
        """,
        tmp_path,
    )
    assert "worker []" in output and "main []" in output, output


@pytest.mark.parametrize(
    "first_import",
    [
        "import exaonepath_hf",
        "import transformers; import exaonepath_hf",
        "from transformers import AutoModel; import exaonepath_hf",
        "import exaonepath_hf; from transformers import pipeline",
        "from exaonepath_hf.modeling_exaonepath import ExaonePathModel",
        "from exaonepath_hf.image_processing_exaonepath import ExaonePathImageProcessor",
        "from exaonepath_hf.configuration_exaonepath import ExaonePathConfig",
        "from exaonepath_hf.stain_normalization import MacenkoNormalizer",
        "from exaonepath_hf import ExaonePathModel",
    ],
)
def test_auto_classes_are_registered_whatever_the_import_order(first_import, tmp_path):
    output = run_python(
        f"""
        {first_import}
        from transformers import AutoConfig, AutoImageProcessor, AutoModel
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
        config = AutoConfig.for_model("exaonepath", hidden_size=32, num_hidden_layers=1, num_attention_heads=1)
        model = AutoModel.from_config(config)
        print(type(config).__module__, type(model).__name__, IMAGE_PROCESSOR_MAPPING[type(config)])
        """,
        tmp_path,
    )
    assert "exaonepath_hf.configuration_exaonepath ExaonePathModel" in output
    assert "ExaonePathImageProcessor" in output


def test_readme_loading_calls_never_prompt_for_remote_code(tiny_model_dir, shared_data, tmp_path):
    """The README's calls after `import exaonepath_hf`, with input() made to fail loudly if transformers asks."""
    patch = shared_data / "crc-val-he-7k-samples" / "TUM-TCGA-DRHQMTQA.png"
    output = run_python(
        f"""
        import builtins

        def refuse(prompt=""):
            raise AssertionError("prompted: " + prompt)

        builtins.input = refuse
        import exaonepath_hf
        from exaonepath_hf.convert import save_folder
        from transformers import AutoImageProcessor, AutoModel, pipeline

        save_folder(AutoModel.from_pretrained({str(tiny_model_dir)!r}), "folder")
        model = AutoModel.from_pretrained("folder")
        processor = AutoImageProcessor.from_pretrained("folder")
        extractor = pipeline("image-feature-extraction", model="folder")
        print(type(model).__name__, type(processor).__name__, len(extractor({str(patch)!r}, pool=True)[0]))
        """,
        tmp_path,
    )
    assert REMOTE_CODE_PROMPT not in output
    assert "ExaonePathModel ExaonePathImageProcessor 64" in output


# ---------------------------------------------------------------- console scripts


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_console_script_help_uses_underscore_flags(name, capsys):
    module, function = console_scripts()[name].split(":")
    main = getattr(__import__(module, fromlist=[function]), function)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:")
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text))
    dashed_only = sorted(
        flag for flag in flags if "-" in flag[2:] and "--" + flag[2:].replace("-", "_") not in flags
    )
    assert not dashed_only, f"{name}: options without the underscore spelling: {dashed_only}"


# What a console script must not import to answer `--help` or a bad flag (seconds of start-up on every call).
HEAVY_FOR_COMMANDS = (*HEAVY, "datasets", "accelerate", "evaluate", "sklearn", "h5py")


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_console_script_answers_help_and_argument_errors_without_importing_torch(name, tmp_path):
    module, function = console_scripts()[name].split(":")
    output = run_python(
        f"""
        import contextlib, io, sys
        from {module} import {function} as main

        for argv in (["--help"], ["--no_such_flag"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main(argv)
                    code = None
                except SystemExit as error:
                    code = error.code
            print(argv[0], code, sorted(m for m in {HEAVY_FOR_COMMANDS!r} if m in sys.modules))
        """,
        tmp_path,
    )
    assert output.strip().splitlines()[-2:] == ["--help 0 []", "--no_such_flag 2 []"], output


def test_light_command_choices_match_the_registries():
    """The light command modules spell the names of registry entries that their parsers offer as choices."""
    from exaonepath_hf.eval.patch import cli as patch_cli
    from exaonepath_hf.eval.patch.probes import PRESETS
    from exaonepath_hf.eval.patch.tasks import PAPER_TASK_ORDER
    from exaonepath_hf.eval.robustness import cli as robustness_cli
    from exaonepath_hf.eval.robustness.run import SETTINGS
    from exaonepath_hf.eval.robustness.tasks import ROBUSTNESS_TASKS
    from exaonepath_hf.eval.slide.mil import HEADS
    from exaonepath_hf.eval.slide.settings import HEAD_NAMES

    assert patch_cli.PAPER_TASK_NAMES == PAPER_TASK_ORDER
    assert patch_cli.PROTOCOL_NAMES == tuple(sorted(PRESETS))
    assert robustness_cli.ROBUSTNESS_TASK_NAMES == tuple(sorted(ROBUSTNESS_TASKS))
    assert set(robustness_cli.INPUT_SETTING_OF_SWITCH.values()) == set(SETTINGS)
    assert set(HEAD_NAMES) == set(HEADS)


def test_ctrl_c_ends_a_command_in_one_line_that_says_how_to_go_on(capsys):
    from exaonepath_hf.cli import INTERRUPTED_EXIT_CODE, run_command

    def interrupted():
        raise KeyboardInterrupt

    assert run_command("exaonepath-x", interrupted) == INTERRUPTED_EXIT_CODE == 130
    assert capsys.readouterr().err == "exaonepath-x: interrupted: rerun the same command to resume\n"


def test_the_declared_transformers_range_is_the_one_ci_tests_at_both_ends():
    """setup.cfg's bounds of transformers are the versions .ci/transformers_range installs and tests."""
    script = (PROJECT_ROOT / ".ci" / "transformers_range").read_text()
    oldest = re.search(r"^oldest=(\S+)$", script, re.MULTILINE).group(1)
    newest = re.search(r"^newest=(\S+)$", script, re.MULTILINE).group(1)
    requirement = re.search(
        r"^\s+transformers(>=\S+)$", (PROJECT_ROOT / "setup.cfg").read_text(), re.MULTILINE
    )
    lower, upper = re.fullmatch(r">=([\d.]+),<([\d.]+)", requirement.group(1)).groups()
    assert lower == oldest
    major, minor, _ = newest.split(".")
    assert upper == f"{major}.{int(minor) + 1}"  # the newest tested minor release is the last one allowed
    assert ".ci/transformers_range" in (PROJECT_ROOT / ".ci" / "run").read_text()
