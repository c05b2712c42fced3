"""The YAML configurations shipped with the package, found by name without importing torch: the training
command lists them in its `--help`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["config_path", "packaged_config_names"]

_PACKAGE = "exaonepath_hf.train"


def packaged_config_names(folder: str = "configs") -> list[str]:
    """Names of the YAML files shipped in `exaonepath_hf.train/<folder>` (`configs` or `accelerate_configs`)."""
    root = resources.files(_PACKAGE) / folder
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def config_path(name_or_path: str | Path, folder: str = "configs") -> Path:
    """A YAML file given by path, or by the name of a packaged one (`cpu_smoke` -> its installed file)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    if path.suffix == "" and len(Path(name).parts) == 1:
        packaged = resources.files(_PACKAGE) / folder / f"{name}.yaml"
        if packaged.is_file():
            return Path(str(packaged))  # an installed package is unpacked on disk (setuptools, not a zip)
    raise FileNotFoundError(
        f"config {name_or_path!r} is neither a file nor a packaged config "
        f"({', '.join(packaged_config_names(folder))})"
    )
