"""Executes the figure notebooks top to bottom (for `make figures` and the tests), with nbclient.

The kernel is this interpreter (a kernelspec written to a temporary folder), not whatever "python3" kernel
Jupyter finds on the machine, so the notebooks see the same environment as the caller. Notebooks read their
paths from the environment in their first cell (VLCACHE_RESULTS, VLCACHE_FIGURES, ...), which the kernel
inherits.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "vlcache-python"


@contextmanager
def _environ(extra: Mapping[str, str]):
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update({k: str(v) for k, v in extra.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute_notebook(path: str | Path, env: Mapping[str, str] | None = None, timeout: int = 600,
                     save_to: str | Path | None = None):
    """Runs every cell of the notebook at `path` (working directory: its folder) and returns it executed;
    raises nbclient's CellExecutionError, naming the cell, if one fails. `save_to`: where to write the
    executed copy."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp, _environ(env or {}):
        spec_dir = Path(tmp) / KERNEL
        spec_dir.mkdir()
        spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "vlcache (this interpreter)", "language": "python"}
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[tmp]))
        if sys.platform != "win32":  # local sockets: no TCP port opened, no "unencrypted" warning
            km.transport, km.ip = "ipc", str(Path(tmp) / "kernel-ipc")
        resources = {"metadata": {"path": str(path.parent)}}
        client = NotebookClient(nb, km=km, timeout=timeout, resources=resources)
        try:
            client.execute()
        finally:  # nbclient leaves a kernel manager it was given running: stop the kernel here
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    if save_to is not None:
        nbformat.write(nb, str(save_to))
    return nb


def notebooks(folder: str | Path = NOTEBOOKS) -> list[Path]:
    return sorted(Path(folder).glob("*.ipynb"))
