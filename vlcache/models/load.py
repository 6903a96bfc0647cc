"""Loads a model and its processor from its config group and wraps it in the family's adapter."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

from vlcache.models.adapter import LlavaAdapter
from vlcache.models.hub import require_hf

log = logging.getLogger(__name__)

ADAPTERS = {"llava": LlavaAdapter}
SOURCES = ("embedded", "random", "hf")
CHECKPOINT = Path(__file__).resolve().parent.parent / "zoo" / "checkpoint"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; valid here: auto, cpu")
    return torch.device(device)


def check_model(cfg: dict) -> None:
    """Fails fast (before loading anything) on an unknown family/source or a real model unavailable offline."""
    if cfg["family"] not in ADAPTERS:
        raise ValueError(f"unknown model family {cfg['family']!r}; valid: {', '.join(ADAPTERS)}")
    if cfg["source"] not in SOURCES:
        raise ValueError(f"unknown model source {cfg['source']!r}; valid: {', '.join(SOURCES)}")
    if cfg["source"] == "hf":
        require_hf(cfg["hf_id"], "model", cfg.get("path"), f"model {cfg['name']}", "model.path")


def embedded_checkpoint(cfg: dict) -> Path | None:
    path = Path(cfg["path"]) if cfg.get("path") else CHECKPOINT
    return path if (path / "config.json").exists() else None


@lru_cache(maxsize=2)
def _load(family: str, source: str, path: str | None, dtype: str, device: str, seed: int):
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    if source == "random" or path is None:
        from vlcache.zoo.model import build_random_llava

        model, processor = build_random_llava(seed)
    else:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
        processor = AutoProcessor.from_pretrained(path)
    model = model.to(device=dev, dtype=torch_dtype).eval()
    return ADAPTERS[family](model, processor, dev)


def load_model(cfg: dict, device: torch.device, seed: int = 0):
    """The adapter for a model config; reused across the jobs of one process (sweeps)."""
    check_model(cfg)
    path = None
    if cfg["source"] == "embedded":
        ckpt = embedded_checkpoint(cfg)
        if ckpt is None:
            log.warning("no trained embedded checkpoint found: using the random-weight stand-in")
        path = str(ckpt) if ckpt else None
    elif cfg["source"] == "hf":
        path = cfg.get("path") or cfg["hf_id"]
    return _load(cfg["family"], cfg["source"], path, cfg.get("dtype", "float32"), str(device), seed)
