"""A decode rule's per-layer update on a second CUDA stream, beside the step's next layers.

H2O's update of layer i (vlcache/kernels/rule_ops.py, `h2o_step_`) reads the logits layer i's attention wrote and
changes only layer i's cache, which nothing reads again until the next step's layer i. So it need not hold up
layer i's output projection: forked after layer i's attention onto a side stream, it runs beside the next
projections (bandwidth-bound kernels with free thread slots on every multiprocessor), and the step joins it
at its end. The fork and join are events, so a CUDA graph captures them as edges (the standard multi-stream
capture: the side stream waits on the capturing stream, and the capturing stream waits on it before the capture
ends; `torch.cuda.Stream.wait_stream` records and waits on an event).

The attention writes its logits into one of `copies` scratch buffers (layer i into `i % copies`), so layer i's
attention waits (`before`) for the update of layer `i - copies`, the last reader of its buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class SideUpdates:
    """Fork points, per layer, of updates that run on one side stream of `device` (serialised there in layer
    order), and the waits that keep `copies` shared buffers safe. `fork(i)` wraps layer i's update, `before(i)`
    precedes layer i's attention, `join()` ends the step."""

    def __init__(self, device: torch.device, layers: int, copies: int) -> None:
        if copies < 1:
            raise ValueError(f"copies must be at least 1; got {copies}")
        self.stream = torch.cuda.Stream(device)
        self.copies = copies
        self.done = [torch.cuda.Event() for _ in range(layers)]  # for `before`: layer j's update has run
        self.pending = -1  # the last layer forked this step (-1: none)

    def before(self, layer_idx: int) -> None:
        """Layer `layer_idx`'s attention may overwrite the buffer that layer `layer_idx - copies` reads."""
        j = layer_idx - self.copies
        if 0 <= j <= self.pending:
            torch.cuda.current_stream(self.stream.device).wait_event(self.done[j])

    @contextmanager
    def fork(self, layer_idx: int, *inputs: torch.Tensor) -> Iterator[None]:
        """Runs the body on the side stream after everything queued so far on the current stream; `inputs`,
        made on the current stream, stay allocated until the side stream is done with them."""
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        for t in inputs:
            t.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            yield
        self.done[layer_idx].record(self.stream)
        self.pending = layer_idx

    def join(self) -> None:
        """The current stream waits for every update forked this step."""
        if self.pending >= 0:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        self.pending = -1
