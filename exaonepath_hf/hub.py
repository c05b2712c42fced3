"""The Hugging Face hub as commands meet it: one line saying what to do when a model is neither on disk nor
reachable, instead of a minute of connection retries and a traceback.

The hub client retries a failed connection with back-off, which is right for a flaky network and wrong for
a machine without one (a cluster node, a laptop on a train): a single request without retries tells the two
apart first.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

__all__ = ["check_model_source", "http_client", "hub_unreachable_reason", "network_errors", "require_hub"]

#: `NAME` or `ORG/NAME` as the hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_PROBE_TIMEOUT_S = 10.0


def http_client() -> ModuleType:
    """The HTTP library the hub client runs on: httpx for huggingface_hub 1.x, httpx2 for 2.x."""
    from huggingface_hub.utils import get_session

    return importlib.import_module(type(get_session()).__module__.partition(".")[0])


def network_errors() -> tuple[type[Exception], ...]:
    """What a hub call raises when the network or the hub fails; the hub client's own errors derive from these."""
    return (http_client().HTTPError, OSError)


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be used from here (offline mode, no connection), or None when it answers."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=_PROBE_TIMEOUT_S)
    except network_errors() as error:
        return f"{constants.ENDPOINT} cannot be reached ({error})"
    return None


def require_hub(action: str) -> None:
    """Raises ValueError naming `action` (e.g. "push to your-org/model") when the hub cannot be used."""
    reason = hub_unreachable_reason()
    if reason is not None:
        raise ValueError(f"cannot {action}: {reason}; run it again where the hub is reachable")


def check_model_source(source: str, revision: str | None = None) -> None:
    """Raises FileNotFoundError or ValueError, in one line, unless `source` is a local path, a hub id already
    in the local cache, or a hub id while the hub is reachable (whether the repository exists is then the
    hub's answer)."""
    from huggingface_hub import try_to_load_from_cache

    if Path(source).exists():
        return
    if not _HUB_ID.fullmatch(source):
        raise FileNotFoundError(
            f"{source}: no such file or folder, and not a hub id (ORG/NAME); pass a model folder "
            "(exaonepath-convert writes one), a weights file or a hub id"
        )
    if isinstance(try_to_load_from_cache(source, "config.json", revision=revision), str):
        return
    reason = hub_unreachable_reason()
    if reason is not None:
        raise ValueError(
            f"{source} is not a local folder and not in the hub cache, and {reason}: pass a local model folder, "
            "or download it once where the hub is reachable"
        )
