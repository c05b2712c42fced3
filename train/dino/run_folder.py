"""The resolved config a run keeps in its folder (`config.yaml`), and what `--resume` and `--export_only`
take from it (the user's side: the docstring of `train/pretrain_dino.py`).

A run's checkpoints fix its model, so a later command on the folder reads the model from the saved config.
An export takes the run's config with the command's output places and only warns when `--config` disagrees:
the run's model is the only one there is to export. A resume stops instead: continuing would not train the
model the command describes, and only the user knows which of the two was meant.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from ...atomic_io import atomic_write_text
from .config import ModelConfig, PretrainConfig, load_config

__all__ = ["ARCHITECTURE_FIELDS", "RUN_CONFIG_FILE", "config_for_existing_run", "save_run_config"]

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.yaml"

#: The model fields a run's checkpoints fix: all but the starting weights and the student's stochastic depth,
#: which shape no tensor and no optimizer state.
ARCHITECTURE_FIELDS = tuple(
    f"model.{f.name}" for f in fields(ModelConfig) if f.name not in ("init_weights", "drop_path_rate")
)
#: What an export takes from the run besides its architecture: the processor carries the stain reference.
_EXPORTED_FIELDS = (*ARCHITECTURE_FIELDS, "data.stain_reference")
#: The run fields that say where a command reads and writes, which an export takes from the command.
_OUTPUT_PLACES = ("output_dir", "export_dir", "push_to_hub", "hub_private")

_HEADER = """\
# The resolved config of this run (after the command's overrides), written when it last started.
# --resume and --export_only take the model from here; resume with --config {path}
"""


def _plain(cfg: PretrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as YAML writes and reads them


def save_run_config(cfg: PretrainConfig) -> Path:
    """Write `cfg` (resolved) to `<run.output_dir>/config.yaml`, atomically; returns the file."""
    path = Path(cfg.run.output_dir) / RUN_CONFIG_FILE
    text = yaml.safe_dump(_plain(cfg), sort_keys=False)
    atomic_write_text(path, _HEADER.format(path=path) + text)
    return path


def _differences(saved: PretrainConfig, wanted: PretrainConfig, names: tuple[str, ...]) -> str:
    """`"model.hidden_size: run 32, --config 64; ..."` over the `section.key` `names` that differ."""
    trees = _plain(saved), _plain(wanted)
    values = [(name, *(tree[name.split(".")[0]][name.split(".")[1]] for tree in trees)) for name in names]
    return "; ".join(f"{name}: run {a!r}, --config {b!r}" for name, a, b in values if a != b)


def config_for_existing_run(cfg: PretrainConfig, export_only: bool) -> PretrainConfig:
    """The config with which to export (`export_only`) or resume the checkpoints in `cfg.run.output_dir`.

    See the module's docstring; raises ValueError when a resume's `cfg` disagrees with the saved architecture.
    """
    path = Path(cfg.run.output_dir) / RUN_CONFIG_FILE
    if not path.is_file():  # a run from before runs saved their config
        return cfg
    saved = load_config(path)
    if export_only:
        differences = _differences(saved, cfg, _EXPORTED_FIELDS)
        if differences:
            logger.warning("exporting the run as %s says, not as --config says (%s)", path, differences)
        places = {name: getattr(cfg.run, name) for name in _OUTPUT_PLACES}
        return replace(saved, run=replace(saved.run, **places))
    differences = _differences(saved, cfg, ARCHITECTURE_FIELDS)
    if differences:
        raise ValueError(
            f"{cfg.run.output_dir} holds a run of another model ({differences}): resume it with --config {path} "
            "(and any overrides), or choose another run.output_dir for a new run"
        )
    return cfg
