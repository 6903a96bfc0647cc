"""Offline checks for real models and datasets: fail within seconds, before anything heavy loads."""

from __future__ import annotations

import os
import socket
from pathlib import Path

HUB_HOST = "huggingface.co"


class MissingResource(RuntimeError):
    """A model or dataset that is neither local nor reachable; the message says how to provide it."""


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def in_hf_cache(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
        return True
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False


def require_hf(repo_id: str, repo_type: str, local_path: str | None, what: str, override: str) -> None:
    """Raises `MissingResource` unless `repo_id` is at `local_path`, in the local HF cache, or downloadable."""
    if local_path:
        if Path(local_path).exists():
            return
        raise MissingResource(f"{what} path {local_path!r} does not exist; set {override}=<existing folder>")
    if in_hf_cache(repo_id, repo_type) or hub_reachable():
        return
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    raise MissingResource(
        f"{what} {repo_id!r} is not in the local Hugging Face cache ({cache}) and the Hub is unreachable "
        f"(offline). Provide it with {override}=/path/to/local/copy, or pre-fill the cache on a machine with "
        f"network (`hf download {repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''}`) and "
        "copy the cache folder here (HF_HOME points to it)."
    )
