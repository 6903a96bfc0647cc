"""The prefill's attention backends (vlcache/engine/prefill_attention.py): SDPA and FlashAttention-4 against a float64
reference, the choice between them, and the route from the adapter's setting to the kernel."""

import sys
from functools import lru_cache

import pytest
import torch

from vlcache.engine import prefill_attention as pa


def reference(q, k, v, mask, scale):
    """float64 causal (or masked) grouped attention; `[B, Hq, L, D]` in, `[B, L, Hq, D]` out."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(g, 1) for x in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    L = q.shape[2]
    allowed = torch.ones(L, L, dtype=torch.bool).tril() if mask is None else mask.cpu()
    s = s.masked_fill(~allowed.to(s.device), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def inputs(b, L, hq, hkv, d, dtype=torch.float32, device="cpu", seed=None):
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return [torch.randn(b, h, L, d, generator=g, device=device, dtype=dtype) for h in (hq, hkv, hkv)]


def fake_fa4(calls):
    """FlashAttention-4's calling convention (`[B, L, H, D]` views, `causal=True`) over the float64 reference."""

    def fa4(q, k, v, softmax_scale, causal):
        assert causal and q.shape[1] == k.shape[1] and q.stride(-1) == 1
        calls.append(tuple(q.shape))
        out = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, softmax_scale)
        return out.to(q.dtype), None  # (out, lse), as flash_attn_func returns with return_lse=False

    return fa4


@pytest.mark.parametrize("shape", [(2, 37, 4, 2, 16), (1, 50, 6, 6, 8), (3, 9, 8, 1, 32)])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_equals_float64_reference(shape, masked):
    q, k, v = inputs(*shape)
    b, L = shape[:2]
    mask = None
    if masked:  # left padding, as prefill_mask builds it
        pad = torch.randint(0, L // 2, (b,))
        valid = torch.arange(L)[None] >= pad[:, None]
        mask = (torch.ones(L, L, dtype=torch.bool).tril()[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool)
        mask = mask[:, None]
    out = pa.prefill_attention(q, k, v, mask, 0.3, "auto")  # CPU: SDPA whatever is installed
    assert out.shape == (b, L, shape[2], shape[4]) and out.is_contiguous()
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, 0.3), atol=1e-5, rtol=1e-5)


def test_backend_names_and_reasons_are_checked(monkeypatch):
    q, k, v = inputs(1, 8, 2, 1, 8)
    with pytest.raises(ValueError, match="unknown prefill_attention 'flash'; valid: auto, sdpa, fa4"):
        pa.prefill_attention(q, k, v, None, 1.0, "flash")
    # not installed: the import itself fails (a fresh cache of load_fa4, dropped after the test)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    monkeypatch.setattr(pa, "load_fa4", lru_cache(maxsize=1)(pa.load_fa4.__wrapped__))
    assert "not installed" in pa.fa4_unusable(q, k, None) and "vlcache[fa4]" in pa.fa4_unusable(q, k, None)
    with pytest.raises(RuntimeError, match="prefill_attention=fa4 cannot run this call: flash-attn-4 is not installed"):
        pa.prefill_attention(q, k, v, None, 1.0, "fa4")
    broken = "flash-attn-4 failed to import: RuntimeError: No CTK flavor installed"
    monkeypatch.setattr(pa, "load_fa4", lambda: (None, broken))  # a broken install: auto takes SDPA, fa4 says why
    assert pa.fa4_unusable(q, k, None) == broken
    out = pa.prefill_attention(q, k, v, None, 1.0, "auto")
    torch.testing.assert_close(out.double(), reference(q, k, v, None, 1.0), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="No CTK flavor installed"):
        pa.prefill_attention(q, k, v, None, 1.0, "fa4")
    monkeypatch.setattr(pa, "load_fa4", lambda: (fake_fa4([]), None))
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    assert "padding mask" in pa.fa4_unusable(q, k, mask)
    assert "device cpu" in pa.fa4_unusable(q, k, None)


def test_fa4_route_from_the_adapter_to_the_kernel(tiny_adapter, monkeypatch):
    """`adapter.prefill_attention` reaches every layer's prefill attention; its output layout is the module's."""
    from conftest import preset, random_images

    from vlcache.engine.generate import generate
    from vlcache.policies.policy import build_policy

    calls = []
    monkeypatch.setattr(pa, "load_fa4", lambda: (fake_fa4(calls), None))
    monkeypatch.setattr(pa, "fa4_unusable", lambda q, k, mask: None if mask is None else "a padding mask")
    one = tiny_adapter.build_inputs(["How many shapes are there?"], [random_images(1)])
    policy = build_policy(preset("snapkv"), 0.5)
    outs = {}
    try:
        for backend in ("sdpa", "fa4"):
            tiny_adapter.prefill_attention = backend
            outs[backend] = generate(tiny_adapter, policy, one, 4)
    finally:
        tiny_adapter.prefill_attention = "auto"
    assert len(calls) == tiny_adapter.num_layers  # one call per layer, none from SDPA's run
    assert outs["fa4"].tokens == outs["sdpa"].tokens
    assert outs["fa4"].kept_positions[0].equal(outs["sdpa"].kept_positions[0])


def test_auto_takes_sdpa_where_fa4_cannot_run(tiny_adapter, batch_inputs, monkeypatch):
    calls = []
    monkeypatch.setattr(pa, "load_fa4", lambda: (fake_fa4(calls), None))
    from conftest import preset

    from vlcache.engine.generate import generate
    from vlcache.policies.policy import build_policy

    generate(tiny_adapter, build_policy(preset("full"), 1.0), batch_inputs, 2)  # CPU and a padding mask: SDPA
    assert calls == []
    try:
        tiny_adapter.prefill_attention = "fa4"
        with pytest.raises(RuntimeError, match="prefill_attention=fa4 cannot run this call: a padding mask"):
            generate(tiny_adapter, build_policy(preset("full"), 1.0), batch_inputs, 2)
    finally:
        tiny_adapter.prefill_attention = "auto"


def test_job_config_checks_the_backend():
    from test_run import _cfg

    from vlcache.eval.job import validate

    with pytest.raises(ValueError, match="unknown prefill_attention 'fast'; valid: auto, sdpa, fa4"):
        validate(_cfg("prefill_attention=fast", "model=tiny_random"))


def _fa4_runs() -> bool:
    if not torch.cuda.is_available() or pa.load_fa4()[0] is None:
        return False
    return torch.cuda.get_device_capability()[0] in (9, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not _fa4_runs(), reason="needs flash-attn-4 on a Hopper or Blackwell GPU")
@pytest.mark.parametrize("shape", [(2, 777, 8, 2, 128), (1, 1025, 4, 4, 64), (3, 130, 32, 8, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fa4_equals_float64_reference(shape, dtype):
    q, k, v = inputs(*shape, dtype=dtype, device="cuda")
    scale = shape[-1] ** -0.5
    assert pa.fa4_unusable(q, k, None) is None
    ref = reference(q, k, v, None, scale)
    fa4 = pa.prefill_attention(q, k, v, None, scale, "fa4")
    sdpa = pa.prefill_attention(q, k, v, None, scale, "sdpa")
    assert fa4.shape == sdpa.shape == ref.shape and fa4.dtype == dtype and fa4.is_contiguous()
    err_fa4, err_sdpa = ((x.double() - ref).abs().max().item() for x in (fa4, sdpa))
    assert err_fa4 < 2e-2 and err_fa4 <= 2 * err_sdpa + 1e-3, (err_fa4, err_sdpa)
