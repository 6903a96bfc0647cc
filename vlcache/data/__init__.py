"""The embedded synthetic benchmarks: generators, the shipped lmms-eval tasks (tasks/), and their builder.

`generators()` maps each task name to `sample(split, index) -> dict`; a sample is a pure function of its
task, split and index (render.sample_seed keeps test and training seeds disjoint).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "tasks"


def generators() -> dict[str, Callable[[str, int], dict]]:
    from vlcache.data import synth_caption, synth_count, synth_docvqa, synth_multi

    return {m.TASK: m.sample for m in (synth_docvqa, synth_caption, synth_count, synth_multi)}
