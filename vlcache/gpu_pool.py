"""One job per GPU: a pool of lock files, one per visible GPU, shared by the jobs of a local sweep.

joblib (the `gpus` launcher) runs as many jobs at once as there are GPUs; each job takes the first GPU whose
lock it can hold and keeps it until it ends. The locks are advisory `flock`s: a job that dies releases its
GPU with its process.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_DIR = Path(os.environ.get("VLCACHE_GPU_LOCKS", "/tmp/vlcache-gpu-locks"))


def gpu_count() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


@contextmanager
def hold_gpu(count: int, lock_dir: Path = LOCK_DIR, poll_s: float = 0.5) -> Iterator[int]:
    """Blocks until one of GPUs `0..count-1` is free, yields its index, frees it on exit."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            fd = os.open(lock_dir / f"gpu{index}.lock", os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield index
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        time.sleep(poll_s)
