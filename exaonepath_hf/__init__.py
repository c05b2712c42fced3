"""exaonepath-hf: EXAONEPath (arXiv 2408.00380) as a Hugging Face model, with Macenko built in.

The package root imports neither torch nor transformers: `exaonepath-tile` and each of its worker processes import
`exaonepath_hf.tiling`, which runs this file first and needs neither. The public classes are attributes resolved on
first use (PEP 562 `__getattr__`).

The package's one import-time side effect: importing it arranges for `register_auto_classes()` to run, which
registers the classes with transformers' Auto classes, so that after `import exaonepath_hf`,
`AutoModel.from_pretrained(folder)`, `AutoImageProcessor.from_pretrained(folder)` and `pipeline(...)` work on a
converted folder without `trust_remote_code`, whatever was imported first. Why at import and not only on an explicit
call: that one import is how users of a transformers model package expect to enable it (tests/test_architecture.py
pins every import order); and it cannot simply run here, since it imports transformers, which the root must not
(above).

How: when transformers' Auto classes are already imported, the registration runs at once. Otherwise a finder goes
first on `sys.meta_path`; it finds nothing itself, but wraps the loaders of transformers' modules and of the core
modules so that the registration runs when `transformers.models.auto` has been imported (which every `AutoModel`,
`AutoImageProcessor` or `pipeline` call does) and the outermost of those imports has finished (registering in the
middle of an import would meet half-executed modules); then it removes itself from `sys.meta_path`.
`register_auto_classes()` also does it explicitly, once, at a point of the caller's choosing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ExaonePathConfig": "configuration_exaonepath",
    "ExaonePathForImageClassification": "modeling_exaonepath",
    "ExaonePathImageProcessor": "image_processing_exaonepath",
    "ExaonePathModel": "modeling_exaonepath",
    "ExaonePathPreTrainedModel": "modeling_exaonepath",
    "DEFAULT_STAIN_REFERENCE": "stain_normalization",
    "MacenkoNormalizer": "stain_normalization",
    "MacenkoOutput": "stain_normalization",
    "StainReference": "stain_normalization",
}

__all__ = [
    "DEFAULT_STAIN_REFERENCE",
    "ExaonePathConfig",
    "ExaonePathForImageClassification",
    "ExaonePathImageProcessor",
    "ExaonePathModel",
    "ExaonePathPreTrainedModel",
    "MacenkoNormalizer",
    "MacenkoOutput",
    "StainReference",
    "__version__",
    "register_auto_classes",
]

if TYPE_CHECKING:
    from .configuration_exaonepath import ExaonePathConfig
    from .image_processing_exaonepath import ExaonePathImageProcessor
    from .modeling_exaonepath import (
        ExaonePathForImageClassification,
        ExaonePathModel,
        ExaonePathPreTrainedModel,
    )
    from .stain_normalization import DEFAULT_STAIN_REFERENCE, MacenkoNormalizer, MacenkoOutput, StainReference


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_AUTO_PACKAGE = "transformers.models.auto"
_CORE_MODULES = tuple(f"{__name__}.{module}" for module in sorted(set(_EXPORTS.values())))
_registration_lock = threading.RLock()
_registered = False


def register_auto_classes() -> None:
    """Register EXAONEPath with AutoConfig, AutoModel, AutoModelForImageClassification, AutoImageProcessor.

    Idempotent. Importing the package arranges for this to run as soon as transformers' Auto classes load (the
    module docstring says how); calling it registers at once, importing transformers if need be.
    """
    global _registered
    with _registration_lock:
        if _registered:
            return
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModel,
            AutoModelForImageClassification,
            AutoVideoProcessor,
        )

        from .configuration_exaonepath import ExaonePathConfig
        from .image_processing_exaonepath import ExaonePathImageProcessor
        from .modeling_exaonepath import ExaonePathForImageClassification, ExaonePathModel

        AutoConfig.register(ExaonePathConfig.model_type, ExaonePathConfig, exist_ok=True)
        AutoModel.register(ExaonePathConfig, ExaonePathModel, exist_ok=True)
        AutoModelForImageClassification.register(
            ExaonePathConfig, ExaonePathForImageClassification, exist_ok=True
        )
        AutoImageProcessor.register(
            ExaonePathConfig, image_processor_classes={"torchvision": ExaonePathImageProcessor}, exist_ok=True
        )
        # "No video processor": `pipeline()` also tries AutoVideoProcessor on the folder, which derives a remote
        # video class from the processor's `auto_map` and, without a local entry, asks whether to run remote code.
        AutoVideoProcessor.register(ExaonePathConfig, None, exist_ok=True)
        _registered = True
        _uninstall_hook()


def _is_watched(name: str) -> bool:
    """Modules the registration imports: registering while one of them is half-executed would fail."""
    return name == "transformers" or name.startswith("transformers.") or name in _CORE_MODULES


def _register_if_safe(finished: str) -> None:
    """Register once the Auto classes are loaded and no watched module other than `finished` is mid-import."""
    if _registered or _AUTO_PACKAGE not in sys.modules:
        return
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if name != finished and _is_watched(name) and getattr(spec, "_initializing", False):
            return  # the outermost watched import is still running; its completion calls this again
    register_auto_classes()


class _RegisterAfterImports(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for transformers' and the core's modules it takes the spec the other finders
    give and makes its loader call `_register_if_safe` once the module has executed."""

    _busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if not _is_watched(fullname) or getattr(self._busy, "active", False):
            return None
        self._busy.active = True
        try:
            spec = next(
                (
                    found
                    for finder in list(sys.meta_path)
                    if finder is not self
                    and hasattr(finder, "find_spec")
                    and (found := finder.find_spec(fullname, path, target)) is not None
                ),
                None,
            )
        finally:
            self._busy.active = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            execute = spec.loader.exec_module

            def exec_module(module, execute=execute, name=fullname):
                execute(module)
                _register_if_safe(name)

            spec.loader.exec_module = exec_module
        return spec


_hook = _RegisterAfterImports()


def _uninstall_hook() -> None:
    try:
        sys.meta_path.remove(_hook)
    except ValueError:
        pass


if _AUTO_PACKAGE in sys.modules:
    register_auto_classes()
else:
    sys.meta_path.insert(0, _hook)
