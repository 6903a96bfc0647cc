"""Where and how the Triton kernels launch: CUDA tensors natively, CPU tensors through the interpreter
(``TRITON_INTERPRET=1``, how CI tests them), on the tensor's own GPU when a model spans several."""

from __future__ import annotations

import contextlib
import functools
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET`` set to anything but empty or 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_triton(t: torch.Tensor) -> bool:
    """Whether Triton kernels can take `t`: a CUDA tensor, or a CPU tensor under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (4 in the interpreter: a few splits, so split paths run on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def on_device(t: torch.Tensor):
    """The CUDA device context of `t` (Triton launches on the current device; a model split with device_map
    has layers on several GPUs), or nothing on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
