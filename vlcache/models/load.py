"""Loads a model and its processor from its config group and wraps it in the family's adapter."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

from vlcache.models.adapter import LlavaAdapter
from vlcache.models.hub import require_hf
from vlcache.models.llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from vlcache.models.qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

log = logging.getLogger(__name__)

# `family` in conf/model/*.yaml -> the adapter (which names the transformers class that loads the family)
ADAPTERS = {
    a.family: a for a in (LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter)
}
DEVICE_MAPS = (None, "auto")
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
    if cfg.get("device_map") not in DEVICE_MAPS:
        raise ValueError(f"unknown model.device_map {cfg['device_map']!r}; valid: null (one device), auto")
    if cfg["source"] == "hf":
        require_hf(cfg["hf_id"], "model", cfg.get("path"), f"model {cfg['name']}", "model.path")


def embedded_checkpoint(cfg: dict) -> Path | None:
    path = Path(cfg["path"]) if cfg.get("path") else CHECKPOINT
    return path if (path / "config.json").exists() else None


@lru_cache(maxsize=2)
def _load(family: str, source: str, path: str | None, dtype: str, device: str, seed: int,
          device_map: str | None = None):
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    adapter = ADAPTERS[family]
    if source == "random" or path is None:
        from vlcache.models.tiny import build_tiny

        model, processor = build_tiny(family, seed)
    else:
        import transformers
        from transformers import AutoProcessor

        model_class = getattr(transformers, adapter.model_class)
        # device_map="auto" (accelerate) splits a model too big for one GPU over every visible GPU: each decoder
        # layer, and so its cache layer, lives on its own device; inputs go to the input embedding's device
        placement = {"device_map": device_map} if device_map else {}
        model = model_class.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa", **placement)
        processor = AutoProcessor.from_pretrained(path)
    if device_map and path is not None:  # split over the visible GPUs: inputs go to the input embedding's device
        placement = getattr(model, "hf_device_map", {})
        log.info("model split over %s: %s", sorted({str(d) for d in placement.values()}),
                 {str(d): sum(1 for v in placement.values() if v == d) for d in set(placement.values())})
        return adapter(model.eval(), processor, None)
    model = model.to(device=dev, dtype=torch_dtype).eval()
    return adapter(model, processor, dev)


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
    adapter = _load(cfg["family"], cfg["source"], path, cfg.get("dtype", "float32"), str(device), seed,
                    cfg.get("device_map"))
    adapter.weights = "random stand-in" if path is None else f"checkpoint {path}"  # recorded in metrics.json
    return adapter
