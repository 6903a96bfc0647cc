"""The decode step's projections (vlcache/kernels/linear.py) against float64 references on awkward shapes: column
counts that do not fill a block, 1-16 rows, K in whole and halved blocks, with and without a bias. The Triton form
runs under TRITON_INTERPRET=1 on the CPU (a kernel test file: `make test`) and natively on CUDA."""

import os

import pytest
import torch
import torch.nn.functional as F

from vlcache.kernels import linear
from vlcache.kernels.fused_ops import rms_norm, silu_mul
from vlcache.kernels.linear import LinearConfig, decode_linear

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# the interpreter truncates to bf16 (a bias at every rounding): a SwiGLU output's error then reaches 2.7e-2
BF16_INTERPRET_TOL = {(True, torch.bfloat16): 4e-2}


def _rand(*shape, dtype, scale=1.0):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


def _close(out, ref, dtype, tol=None):
    err = (out.double().cpu() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)
    assert float(err) < (tol or TOL[dtype]), float(err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("b", "n", "k"), [(1, 96, 128), (3, 50, 192), (16, 33, 64), (5, 40, 48), (17, 40, 48), (40, 50, 192), (64, 33, 96)]
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("split", [1, 3])
def test_decode_linear(dtype, b, n, k, bias, split, monkeypatch):
    x, w = _rand(b, k, dtype=dtype), _rand(n, k, dtype=dtype, scale=k**-0.5)
    bb = _rand(n, dtype=dtype) if bias else None
    ran = []
    monkeypatch.setattr(linear, "F", type("F", (), {"linear": lambda *a: ran.append(1) or F.linear(*a)}))
    out = decode_linear(x, w, bb, config=LinearConfig(block_n=32, block_k=64, split_k=split))
    # the Triton form ran (not F.linear) wherever it is meant to: 16-bit on CUDA, everything in the interpreter
    assert not ran or (DEVICE == "cuda" and dtype == torch.float32)
    ref = x.double().cpu() @ w.double().cpu().T + (bb.double().cpu() if bias else 0)
    assert out.shape == (b, n) and out.dtype == dtype
    _close(out, ref, dtype)


def test_decode_linear_falls_back_to_f_linear():
    """K without a 16-multiple block, more rows than one tile: F.linear's own result."""
    for b, k in ((3, 100), (65, 64)):
        x, w = _rand(b, k, dtype=torch.float32), _rand(7, k, dtype=torch.float32)
        assert torch.equal(decode_linear(x, w), F.linear(x, w))
    with pytest.raises(ValueError, match="do not match"):
        decode_linear(_rand(2, 64, dtype=torch.float32), _rand(8, 32, dtype=torch.float32))


def _swiglu_ref(x, w, b):
    """float64 `silu(x Wg^T + bg) · (x Wu^T + bu)`, gate rows first in `w`."""
    y = x.double().cpu() @ w.double().cpu().T + (b.double().cpu() if b is not None else 0)
    g, u = y.chunk(2, dim=-1)
    return F.silu(g) * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("b", "inter", "k"), [(1, 96, 128), (3, 50, 192), (16, 33, 64), (5, 40, 48), (40, 50, 192), (64, 33, 96)]
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("split", [1, 3])
def test_swiglu_linear(dtype, b, inter, k, bias, split):
    x, w = _rand(b, k, dtype=dtype), _rand(2 * inter, k, dtype=dtype, scale=k**-0.5)
    bb = _rand(2 * inter, dtype=dtype) if bias else None
    cfg = LinearConfig(block_n=32, block_k=64, split_k=split)
    out = linear.swiglu_linear(x, w, bb, config=cfg)
    assert out.shape == (b, inter) and out.dtype == dtype
    _close(out, _swiglu_ref(x, w, bb), dtype, BF16_INTERPRET_TOL.get((INTERPRET, dtype)))
    assert torch.equal(out, silu_mul(decode_linear(x, w, bb, config=cfg)))  # the unfused kernels', bit for bit


def test_swiglu_linear_falls_back_and_checks():
    """More rows than one tile: `silu_mul(F.linear(...))` itself; odd row counts and mismatched K are errors."""
    x, w = _rand(65, 64, dtype=torch.float32), _rand(14, 64, dtype=torch.float32)
    assert torch.equal(linear.swiglu_linear(x, w), silu_mul(F.linear(x, w)))
    with pytest.raises(ValueError, match="gate and up"):
        linear.swiglu_linear(x, _rand(13, 64, dtype=torch.float32))
    with pytest.raises(ValueError, match="do not match"):
        linear.swiglu_linear(x, _rand(14, 32, dtype=torch.float32))


def test_plan_tiers_and_splits():
    """Rows pick the tile (16, then 64) and the config's `wide` beyond 16; split-K falls back to one slice where no
    block of 16 or more divides K's slices."""
    wide = LinearConfig(block_n=128, block_k=64, split_k=4)
    cfg = LinearConfig(block_n=32, block_k=256, wide=wide)
    assert linear._plan(16, 4096, cfg) == (cfg, 16, 256, 1)
    assert linear._plan(17, 4096, cfg) == (wide, 64, 64, 4)
    assert linear._plan(64, 14336, cfg) == (wide, 64, 64, 4)  # 14336 / 4 = 3584 = 56 · 64
    assert linear._plan(64, 4160, cfg) == (wide, 64, 16, 4)  # 4160 / 4 = 1040 = 65 · 16
    assert linear._plan(64, 100, LinearConfig(block_k=64, split_k=2)) is None
    assert linear._plan(8, 48, LinearConfig(block_k=64, split_k=2)) == (LinearConfig(block_k=64, split_k=2), 16, 16, 1)
    assert linear._plan(8, 96, LinearConfig(block_k=64, split_k=3)) == (LinearConfig(block_k=64, split_k=3), 16, 32, 3)


@pytest.mark.parametrize("swiglu", [False, True])
def test_split_k_is_deterministic_and_resets_its_counters(swiglu):
    """The slices are added in slice order whichever program finishes last: the same bits on every run, within
    rounding of one slice; the per-tile counters are back at 0 after each launch."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x, w = _rand(37, 512, dtype=dtype), _rand(2 * 200, 512, dtype=dtype, scale=512**-0.5)
    fn = linear.swiglu_linear if swiglu else decode_linear
    outs = [fn(x, w, config=LinearConfig(block_n=32, block_k=64, split_k=8)) for _ in range(4)]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert int(linear._COUNTERS[x.device].abs().sum()) == 0
    one = fn(x, w, config=LinearConfig(block_n=32, block_k=64))
    _close(outs[0], one.double().cpu(), dtype, 2e-2 if dtype == torch.bfloat16 else None)


def _normed_ref(h, g, eps, w, b, swiglu):
    """float64 RMSNorm(h) · g, then the projection (and SwiGLU), from the rounded residual stream `h`."""
    hd = h.double().cpu()
    y = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * g.double().cpu()
    if swiglu:
        return _swiglu_ref(y, w, b)
    return y @ w.double().cpu().T + (b.double().cpu() if b is not None else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("b", "k", "n", "m", "split"),
    [(1, 128, 96, 64, 1), (3, 48, 48, 33, 3), (16, 64, 80, 40, 2), (5, 192, 40, 17, 1), (40, 192, 48, 33, 3),
     (64, 64, 80, 40, 2), (23, 128, 96, 17, 1)],
)  # fmt: skip
@pytest.mark.parametrize(("bias", "swiglu"), [(False, False), (True, False), (True, True), (False, True)])
def test_residual_norm_linear_then_normed_linear(dtype, b, k, n, m, split, bias, swiglu):
    """A projection with the residual add and the next RMSNorm in its epilogue, then the projection of the normed
    rows: `h` bit for bit as `decode_linear` then `rms_norm` give it, the second output against float64, and the
    partial-sum form ran where the Triton form does (16-bit on CUDA, everything in the interpreter)."""
    x, res = _rand(b, k, dtype=dtype), _rand(b, n, dtype=dtype, scale=3.0)  # a stream well away from unit scale
    w1, g = _rand(n, k, dtype=dtype, scale=k**-0.5), _rand(n, dtype=dtype).abs() + 0.5
    w2 = _rand(2 * m if swiglu else m, n, dtype=dtype, scale=n**-0.5)
    b1, b2 = (_rand(n, dtype=dtype), _rand(w2.shape[0], dtype=dtype)) if bias else (None, None)
    cfg = LinearConfig(block_n=16, block_k=32, split_k=split)  # several programs' partial sums, even at n = 33
    h, normed = linear.residual_norm_linear(x, w1, b1, res, g, 1e-5, config=cfg)
    out = linear.normed_linear(normed, w2, b2, swiglu=swiglu, config=cfg)
    h_ref, y = rms_norm(res, g, 1e-5, residual=decode_linear(x, w1, b1, config=cfg))
    assert torch.equal(h, h_ref)
    # the two launches where cuBLAS keeps float32, and where the normed rows' K is not in 16s (n = 40)
    assert (normed.sq is None) == ((DEVICE == "cuda" and dtype == torch.float32) or n % 16 > 0)
    if normed.sq is not None:
        assert normed.sq.shape[0] == -(-n // 16)
    assert out.shape == (b, m) and out.dtype == dtype
    _close(out, _normed_ref(h, g, 1e-5, w2, b2, swiglu), dtype, BF16_INTERPRET_TOL.get((INTERPRET, dtype)))


def test_norm_fold_falls_back_and_checks():
    """Beyond one tile of rows: `decode_linear`, `rms_norm` and the projection, exactly; mismatched shapes are
    errors."""
    x, res = _rand(65, 64, dtype=torch.float32), _rand(65, 24, dtype=torch.float32)
    w1, g, w2 = _rand(24, 64, dtype=torch.float32), _rand(24, dtype=torch.float32), _rand(14, 24, dtype=torch.float32)
    h, normed = linear.residual_norm_linear(x, w1, None, res, g, 1e-6)
    h_ref, y = rms_norm(res, g, 1e-6, residual=F.linear(x, w1))
    assert normed.sq is None and torch.equal(h, h_ref) and torch.equal(normed.x, y)
    assert torch.equal(linear.normed_linear(normed, w2), F.linear(y, w2))
    assert torch.equal(linear.normed_linear(normed, w2, swiglu=True), silu_mul(F.linear(y, w2)))
    with pytest.raises(ValueError, match="must be"):
        linear.residual_norm_linear(x, w1, None, res[:, :20], g, 1e-6)
    with pytest.raises(ValueError, match="gate and up"):
        linear.normed_linear(linear.Normed(res[:4], torch.zeros(1, 16), 1e-6), w2[:13], swiglu=True)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_split_k_counters_are_not_made_inside_a_capture(monkeypatch):
    """Counters allocated inside a capture would belong to the graph's pool: the first split-K launch must run
    outside one (the fused step's eager warm-up does)."""
    monkeypatch.setattr(linear, "_COUNTERS", {})
    x, w = _rand(20, 256, dtype=torch.bfloat16), _rand(64, 256, dtype=torch.bfloat16, scale=1 / 16)
    cfg = LinearConfig(block_n=32, block_k=64, split_k=2)
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        decode_linear(x, w, config=cfg)
    decode_linear(x, w, config=cfg)  # outside: made once, then reused under capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_linear(x, w, config=cfg)
    g.replay()
    _close(out, x.double().cpu() @ w.double().cpu().T, torch.bfloat16)
