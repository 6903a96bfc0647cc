"""Every architecture at its real size, random bf16 weights, every preset at one budget: runs without error, and
the kept KV bytes match what the budget promises.

Nothing is downloaded: each model is built from its config class with the published sizes typed in below
(hidden size, layers, heads, KV heads, vision tower, anyres grid / dynamic-resolution geometry), and each prompt
comes from the architecture's real processor class at the published geometry (vlcache/models/tiny.py) over a
character-level tokenizer, on a random image sized so that the prompt has the model's typical image-token
count (576 for LLaVA-1.5, 2,928 for LLaVA-NeXT at 672x672, 3,699 for OneVision at 768x768, 1,728 for Qwen at
1008x1344). The special-token ids of the config are those of that tokenizer.

    python experiments/real_size_check.py [--budget 0.1] [--models llava15_7b,qwen2_vl_7b] [--layers 34b=40]

With `--device-map`, each model is split over every visible GPU (accelerate's balanced map, as
`model.device_map=auto` does for a real checkpoint) and the JSON is `real_size_check_split.json`.

Prints one table and writes `real_size_check.json` to $OUT (or the current folder). Measured = the cache's
kept bytes after compression (`CompressedCache.kept_bytes`); promise = budget · full bytes, except `full` (all
of it), LOOK-M (its text keys on top: k + text keys outside the recent window, per head) and PyramidKV (its
floor-division schedule, policies.md §3); ok = within 1% of the promise.

Imports only torch, transformers, PIL, numpy and vlcache (GPU machines have no hydra): the preset configs come
from Hydra when it is installed, else from `real_size_presets.json` beside this file (written by
`--dump-presets`, kept equal to conf/policy by tests/test_models.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlcache.engine.generate import generate
from vlcache.models.load import ADAPTERS
from vlcache.policies.policy import build_policy

PRESETS = ["full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "elastic", "lookm", "vlcache"]
PRESET_FILE = Path(__file__).with_name("real_size_presets.json")
QUESTION = "What is the total amount due on this invoice, and on which date is the payment expected?"
STEPS = 8

CLIP_L_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, projection_dim=768)
LLAVA16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llama(hidden, inter, layers, heads, kv, vocab, max_pos, theta):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max_pos, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=False)


QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                tie_word_embeddings=False)

# name: (family, image size (h, w), text config, vision config) — the published configs' sizes
MODELS = {
    "llava15_7b": ("llava", (336, 336), llama(4096, 11008, 32, 32, 32, 32064, 4096, 10000.0), CLIP_L_336),
    "llava15_13b": ("llava", (336, 336), llama(5120, 13824, 40, 40, 40, 32064, 4096, 10000.0), CLIP_L_336),
    "llava16_mistral_7b": ("llava_next", (672, 672), {**llama(4096, 14336, 32, 32, 8, 32064, 32768, 1e6),
                                                        "sliding_window": None}, CLIP_L_336),
    "llava_onevision_7b": ("llava_onevision", (768, 768),
                           {**QWEN2_7B, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
                           dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                                num_hidden_layers=26, num_attention_heads=16)),
    "qwen2_vl_7b": ("qwen2_vl", (1008, 1344),
                    {**QWEN2_7B, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                     "mrope_section": [16, 24, 24]}},
                    dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2)),
    "qwen2_5_vl_7b": ("qwen2_5_vl", (1008, 1344),
                      {**QWEN2_7B, "max_position_embeddings": 128000,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
                      dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=3584, num_heads=16,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)),
    "llava16_34b": ("llava_next", (672, 672), llama(7168, 20480, 60, 56, 8, 64064, 4096, 5e6), CLIP_L_336),
}


# -- presets -----------------------------------------------------------------------------------------------------
def compose_presets() -> dict[str, dict]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "conf"
    out = {}
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for name in PRESETS:
            out[name] = OmegaConf.to_container(compose("config", overrides=[f"policy={name}"]).policy, resolve=True)
    return out


def load_presets() -> dict[str, dict]:
    try:
        return compose_presets()
    except ImportError:
        return json.loads(PRESET_FILE.read_text())


# -- models and prompts ------------------------------------------------------------------------------------------
def processor_for(family: str):
    from vlcache.models import tiny

    if family == "llava":
        from vlcache.zoo.processor import build_processor

        return build_processor()
    if family == "llava_next":
        return tiny.llava_next_processor(336, 14, LLAVA16_PINPOINTS)
    if family == "llava_onevision":
        return tiny.onevision_processor(384, 14, max_grid=6)
    return tiny.qwen_processor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)


def build_model(family: str, text: dict, vision: dict, tok, layers: int | None, device: str = "cuda",
                vision_layers: int | None = None):
    import transformers as tf

    if vision_layers:  # smoke tests only: the KV cache does not depend on the vision tower's depth
        vision = dict(vision, **{"depth" if "depth" in vision else "num_hidden_layers": vision_layers})
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = [vision_layers - 1]

    text = dict(text, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if layers:
        text["num_hidden_layers"] = layers
    if family == "llava":
        config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**text),
                                image_token_id=tok.image_token_id, vision_feature_layer=-2,
                                vision_feature_select_strategy="default", projector_hidden_act="gelu")
    elif family == "llava_next":
        text_cls = tf.MistralConfig if "sliding_window" in text else tf.LlamaConfig
        config = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**vision), text_config=text_cls(**text),
                                    image_token_id=tok.image_token_id, image_grid_pinpoints=LLAVA16_PINPOINTS,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default")
    elif family == "llava_onevision":
        pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
        config = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**vision), text_config=tf.Qwen2Config(**text),
            image_token_id=tok.image_token_id, video_token_id=tok.video_token_id, image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    else:
        special = dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                       vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                       vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
        cls = tf.Qwen2VLConfig if family == "qwen2_vl" else tf.Qwen2_5_VLConfig
        config = cls(text_config=text, vision_config=vision, **special)
    model_cls = getattr(tf, ADAPTERS[family].model_class)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly on the GPU: no fp32 copy of 34B weights
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    return model.to(torch.bfloat16).eval()


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# -- promises ----------------------------------------------------------------------------------------------------
def promised_entries(name: str, cfg: dict, budget: float, m: int, text_keys: int, text_before_recent: int,
                     layers: int, heads: int) -> float:
    """Prompt entries (over layers and KV heads) that the preset promises to keep for one prompt of m tokens."""
    k = round(budget * m)
    if name == "full":
        return m * layers * heads
    if name == "lookm":  # every text key on top: k (recent window + image heavy hitters) + text outside the window
        return (k + text_before_recent) * layers * heads
    if name == "pyramidkv":  # policies.md §3: C = budget·m, floor divisions, layer l keeps max − l·step + w
        w, beta = cfg["scorer"]["window"], cfg["allocator"]["beta"]
        if k >= m or k <= w or m < 2 * (k - w):
            return min(k, m) * layers * heads
        lo = (k - w) // beta
        hi = 2 * (k - w) - lo
        if hi >= m - w:
            hi = m - w
            lo = 2 * (k - w) - hi
        step = (hi - lo) // (layers - 1)
        return sum(hi - i * step + w for i in range(layers)) * heads
    return k * layers * heads


# -- the check ---------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        for index in range(torch.cuda.device_count()):  # every GPU of a model split with --device-map
            torch.cuda.synchronize(index)


def split_over_gpus(model):
    """accelerate's balanced device map over every visible GPU (what `from_pretrained(device_map="auto")` does),
    applied to a model built on cuda:0: each decoder layer, and so its cache layer, moves to its own GPU."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    keep_whole = model._no_split_modules
    memory = get_balanced_memory(model, no_split_module_classes=keep_whole, dtype=torch.bfloat16)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=keep_whole,
                                       dtype=torch.bfloat16)
    return dispatch_model(model, device_map=device_map), device_map


def check_model(name: str, budget: float, presets: dict, layers: int | None, device: str = "cuda",
                vision_layers: int | None = None, device_map: bool = False) -> list[dict]:
    family, (h, w), text, vision = MODELS[name]
    processor = processor_for(family)
    t0 = time.time()
    model = build_model(family, text, vision, processor.tokenizer, layers, device, vision_layers)
    gpus = "1"
    if device_map:
        model, placement = split_over_gpus(model)
        used = sorted({d for d in placement.values() if isinstance(d, int)})
        gpus = ",".join(map(str, used))
        print(f"[real_size_check] {name}: split over GPUs {gpus}: "
              + ", ".join(f"cuda:{d} {sum(1 for v in placement.values() if v == d)} modules" for d in used),
              flush=True)
    build_s = time.time() - t0
    adapter = ADAPTERS[family](model, processor, None if device_map else device)
    inputs = adapter.build_inputs([QUESTION], [[random_image(h, w)]])
    info = adapter.prompt_info(inputs)
    m, n_image = int(info.lengths[0]), int(info.image_mask.sum())
    num_layers, heads = adapter.num_layers, adapter.num_kv_heads
    rows = []
    for pname in PRESETS:
        cfg = presets[pname]
        row = dict(model=name, family=family, layers=num_layers, kv_heads=heads, prompt_tokens=m,
                   image_tokens=n_image, policy=pname, budget=budget, build_s=round(build_s, 1), gpus=gpus)
        try:
            sync(device)
            t1 = time.time()
            out = generate(adapter, build_policy(json.loads(json.dumps(cfg)), budget), inputs, STEPS)
            sync(device)
            entry = out.kv_bytes_full / (m * num_layers)  # bytes per (token, layer), all KV heads
            text_keys = m - n_image
            recent = round(cfg.get("recent", 0) * round(budget * m)) if cfg.get("recent", 0) < 1 else 0
            text_before_recent = int((~info.image_mask[0] & info.key_valid[0])[: m - recent].sum())
            promise = promised_entries(pname, cfg, budget, m, text_keys, text_before_recent, num_layers, heads)
            promise_bytes = promise * entry / heads
            row.update(
                status="ok", kv_full_mb=out.kv_bytes_full / 2**20, kv_kept_mb=out.kv_bytes_kept / 2**20,
                promise_mb=promise_bytes / 2**20, kept_over_promise=out.kv_bytes_kept / promise_bytes,
                kept_over_nominal=out.kv_bytes_kept / ((1.0 if pname == "full" else budget) * out.kv_bytes_full),
                realised_budget=out.report.realised_budget, clamped=out.report.clamped,
                ok=abs(out.kv_bytes_kept / promise_bytes - 1) <= 0.01,
                prefill_ms=out.prefill_ms, compress_ms=out.compress_ms, decode_ms_per_token=out.decode_ms_per_token,
                new_tokens=out.new_tokens, peak_gb=(out.peak_gpu_bytes or 0) / 2**30, wall_s=time.time() - t1,
                peak_gb_per_gpu=[round(torch.cuda.max_memory_allocated(i) / 2**30, 2)
                                 for i in range(torch.cuda.device_count())],
            )
        except Exception as exc:  # noqa: BLE001 - one failing preset is a result, not the end of the check
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
            if isinstance(exc, torch.OutOfMemoryError):
                free_memory()
        rows.append(row)
    del adapter, model
    free_memory()
    return rows


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    head = (f"{'model':<19} {'L':>3} {'Hkv':>3} {'m':>5} {'img':>5} {'policy':<12} {'full MB':>8} {'kept MB':>8} "
            f"{'promise':>8} {'kept/pr':>7} {'realised':>8} {'ok':>3} {'prefill ms':>10} {'dec ms/t':>8} "
            f"{'peak GB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:<19} {r['layers']:>3} {r['kv_heads']:>3} {r['prompt_tokens']:>5} "
                         f"{r['image_tokens']:>5} {r['policy']:<12} FAILED {r['error'][:90]}")
            continue
        lines.append(
            f"{r['model']:<19} {r['layers']:>3} {r['kv_heads']:>3} {r['prompt_tokens']:>5} {r['image_tokens']:>5} "
            f"{r['policy']:<12} {r['kv_full_mb']:>8.1f} {r['kv_kept_mb']:>8.2f} {r['promise_mb']:>8.2f} "
            f"{r['kept_over_promise']:>7.4f} {r['realised_budget']:>8.4f} {'yes' if r['ok'] else 'NO':>3} "
            f"{r['prefill_ms']:>10.1f} {r['decode_ms_per_token']:>8.1f} {r['peak_gb']:>7.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--layers", default="", help="reduced layer counts, e.g. llava16_34b=40 (reported)")
    parser.add_argument("--time-limit", type=float, default=540, help="seconds: skip models not started by then")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke test with --layers)")
    parser.add_argument("--vision-layers", type=int, default=None, help="smoke tests: a shallower vision tower")
    parser.add_argument("--device-map", action="store_true",
                        help="split each model over every visible GPU (accelerate's balanced device map)")
    parser.add_argument("--dump-presets", action="store_true", help="write real_size_presets.json and exit")
    args = parser.parse_args()
    if args.dump_presets:
        PRESET_FILE.write_text(json.dumps(compose_presets(), indent=1, sort_keys=True) + "\n")
        return
    out_dir = Path(os.environ.get("OUT", "."))
    layers = {k: int(v) for k, v in (kv.split("=") for kv in args.layers.split(",") if kv)}
    presets = load_presets()
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    start, rows, skipped = time.time(), [], []
    for name in args.models.split(","):
        if time.time() - start > args.time_limit:
            skipped.append(name)
            continue
        print(f"[real_size_check] {name} ...", flush=True)
        try:
            rows += check_model(name, args.budget, presets, layers.get(name), args.device,
                                args.vision_layers, args.device_map)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built or prompted: recorded
            family = MODELS[name][0]
            rows.append(dict(model=name, family=family, layers=layers.get(name) or MODELS[name][2].get(
                "num_hidden_layers", 0), kv_heads=0, prompt_tokens=0, image_tokens=0, policy="*", status="failed",
                error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-3000:]))
            free_memory()
        (out_dir / ("real_size_check_split.json" if args.device_map else "real_size_check.json")).write_text(json.dumps(
            dict(device=device_name, budget=args.budget, torch=torch.__version__,
                 transformers=__import__("transformers").__version__, reduced_layers=layers, skipped=skipped,
                 device_map=args.device_map, gpu_count=torch.cuda.device_count(),
                 rows=rows), indent=1))
    split = f"split over {torch.cuda.device_count()} GPUs; " if args.device_map else ""
    print(f"\ndevice: {device_name}; {split}budget {args.budget}; random bf16 weights; "
          f"reduced layers: {layers or 'none'}; skipped (time): {skipped or 'none'}")
    print(table(rows))
    bad = [r for r in rows if r["status"] != "ok" or not r.get("ok")]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} runs ok (no error, kept bytes within 1% of the promise)")
    for r in bad:
        if r["status"] != "ok":
            print(f"--- {r['model']} {r['policy']}: {r['trace']}")


if __name__ == "__main__":
    main()
