"""Probe: does one launch for two dependent projections, its programs ordered by an atomic ticket and the second's
waiting on per-slice counters of the first's, beat the same two as two launches?

At (64, 2K), budget 0.1, every projection of the decode step is 4.5-5 µs above its floor and the attention about 8
(step_timeline.py: the launch's ramp, when the weights' first tiles are in flight and nothing has arrived, and its
tail, when the last programs finish and the GPU idles). Programmatic dependent launch and L2 prefetch did not
recover that (pdl_micro.py, l2_prefetch_probe.py). A dataflow launch does not end between the two: the consumer's
programs start as the producer's last programs run, and each waits only for the slice of the producer's output
it reads. Here the pair is the MLP's: gate/up with SwiGLU, then down, at the wide tier's shape (64 rows).

* the producer: ``act = silu(x Wg^T) · (x Wu^T)``, one program per 64 columns of ``act`` (224 at I = 14,336),
  each adding 1 to its K slice's counter after its stores;
* the consumer: ``y = act Wd^T``, K split between ``split`` programs per 64 output columns, the last to arrive
  adding the slices in a fixed order (as vlcache/kernels/linear.py's `split_k`), slice ``s`` waiting until the
  producer's programs of its ``K / split`` columns have all counted;
* the fused launch: ``producers + consumers`` programs, each taking a ticket (an atomic counter) and its role from
  it, producers first. A waiting consumer has a higher ticket than every producer, and those hold theirs on an
  SM and never wait, so the wait ends whatever order the GPU starts programs in; the last program to finish
  resets the counters for the next launch. Loads of ``act`` bypass L1 (``.cg``): other SMs wrote it.

Forms timed (one CUDA graph of 32 layers, each layer's own weights, layer l's ``y`` layer l+1's ``x``):
``linear.py`` (the step's `swiglu_linear` then `decode_linear`), ``split BK/ST`` (this file's kernels, two
launches, the consumer's loop over BK of K a step at ST stages), ``fused BK/ST`` (one launch), and diagnostics:
``no wait`` (the fused launch without its waits: a wrong result, what the merge alone costs) and ``atomic`` (polls
by atomic reads instead of acquire loads with a 100 ns pause). The check: every ``split`` and ``fused`` form bit
for bit equal after 32 layers (same sums in the same order), within bf16 of a float32 reference.

    PYTHONPATH=. python experiments/dataflow_probe.py --batches 64,1 --out results/bench/dataflow_probe_h200.json
    TRITON_INTERPRET=1 PYTHONPATH=. python experiments/dataflow_probe.py --cpu-check   # the kernels' sums only

Answer on an H200 (2026-11-22, results/bench/dataflow_probe_h200.json; µs per layer at batch 64, floor 86.0): no.
The two launches take 94.5 (as `linear.py`'s, 94.6); the one launch 103.2, and 102.0 without its waits. A merged
kernel gets the larger role's shared memory: the consumer's 5-stage, 128-wide pipeline needs 160 KB, so the
producer runs one program per SM instead of two (its own kernel: 96 KB), and that costs more than the ramp and
tail it saves. With the consumer cut to fit two per SM (64 of K a step, 80 KB) the two launches are slower already
(100.8: the consumer needs its bytes in flight) and the one launch much slower (118.8; 106.4 without waits): the
waiting consumers hold slots beside producers that all finish at about the same time, since the producers fit in
one wave and do not finish slice by slice. At batch 1 the same order (91.6 against 100.8). Not taken into the
step; a dataflow step would need roles with matching pipelines and producers that finish in order (persistent
programs walking the tiles slice by slice), which this probe does not show to pay.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from experiments.bench_decode import measure_copy_bw
from experiments.decode_kernel_sweep import LAYERS, time_rounds
from vlcache.kernels.linear import SWIGLU_CONFIG, decode_linear, swiglu_linear


@triton.jit
def _sums(x_ptr, w_ptr, s_x, s_w, n_up, rows, r_ok, cols, k_lo, k_len, SWIGLU: tl.constexpr, UPCAST: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """``w[cols] @ x[rows].T`` over K's ``[k_lo, k_lo + k_len)`` (and the up rows ``n_up + cols`` with SWIGLU),
    transposed: ``[BLOCK_N, BLOCK_M]`` float32."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in tl.range(k_lo, k_lo + k_len, BLOCK_K, num_stages=STAGES):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[None, :] * s_x + kk[:, None], mask=r_ok[None, :], other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * s_w + kk[None, :])
        if UPCAST:  # interpreter: 16-bit tl.dot is wrong there
            w, x = w.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(w, x, acc)
        if SWIGLU:
            wu = tl.load(w_ptr + (n_up + cols[:, None]).to(tl.int64) * s_w + kk[None, :])
            if UPCAST:
                wu = wu.to(tl.float32)
            acc_up = tl.dot(wu, x, acc_up)
    return acc, acc_up


@triton.jit
def _producer(t, x_ptr, w1_ptr, a_ptr, done_ptr, B, NI, K1, s_x, s_w1, s_a, TILES_PER_SLICE,
              SIGNAL: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, ST1: tl.constexpr):  # fmt: skip
    rows = tl.arange(0, BLOCK_M)
    r_ok = rows < B
    cols = t * BN1 + tl.arange(0, BN1)
    g, u = _sums(x_ptr, w1_ptr, s_x, s_w1, NI, rows, r_ok, cols, 0, K1, True, UPCAST, BLOCK_M, BN1, BK1, ST1)
    ty = a_ptr.dtype.element_ty
    g = g.to(ty).to(tl.float32)  # fused_ops.silu_mul on the rounded projections, as linear.py's epilogue
    a = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32) * u.to(ty).to(tl.float32)
    tl.store(a_ptr + rows[None, :] * s_a + cols[:, None], a.to(ty), mask=r_ok[None, :])
    if SIGNAL:
        tl.debug_barrier()  # every thread's stores before the count (acq_rel)
        tl.atomic_add(done_ptr + t // TILES_PER_SLICE, 1)


@triton.jit
def _acquire(ptr):
    return tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _pause(ptr):
    tl.inline_asm_elementwise("nanosleep.u32 100; mov.u32 $0, 0;", "=r,l", [ptr], dtype=tl.int32, is_pure=False,
                              pack=1)  # fmt: skip


@triton.jit
def _consumer(u, a_ptr, w2_ptr, y_ptr, ws_ptr, cnt_ptr, done_ptr, B, N2, K2, s_a, s_w2, s_y, TILES2, TILES_PER_SLICE,
              WAIT: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BN2: tl.constexpr, BK2: tl.constexpr, ST2: tl.constexpr,
              POLL: tl.constexpr = 0):  # fmt: skip
    s = u // TILES2  # slice-major: slice 0's programs take the first tickets, as its producers finish first
    tile = u % TILES2
    if WAIT:
        if POLL == 0:  # an atomic read: every poll a read-modify-write at L2
            while tl.atomic_add(done_ptr + s, 0) < TILES_PER_SLICE:
                pass
        elif POLL == 1:  # an acquire load, then a pause before the next
            while _acquire(done_ptr + s) < TILES_PER_SLICE:
                _pause(done_ptr)
    rows = tl.arange(0, BLOCK_M)
    r_ok = rows < B
    cols = tile * BN2 + tl.arange(0, BN2)
    k_len = K2 // SPLIT
    acc, _ = _sums(a_ptr, w2_ptr, s_a, s_w2, 0, rows, r_ok, cols, s * k_len, k_len, False, UPCAST,
                   BLOCK_M, BN2, BK2, ST2)  # fmt: skip
    at = tl.arange(0, BN2)[:, None] * BLOCK_M + rows[None, :]
    tl.store(ws_ptr + (tile * SPLIT + s) * BN2 * BLOCK_M + at, acc)
    tl.debug_barrier()
    if tl.atomic_add(cnt_ptr + tile, 1) == SPLIT - 1:
        tl.store(cnt_ptr + tile, 0)
        acc = tl.zeros([BN2, BLOCK_M], tl.float32)
        for i in tl.static_range(SPLIT):
            acc += tl.load(ws_ptr + (tile * SPLIT + i) * BN2 * BLOCK_M + at, cache_modifier=".cg")
        tl.store(y_ptr + rows[None, :] * s_y + cols[:, None], acc.to(y_ptr.dtype.element_ty), mask=r_ok[None, :])


@triton.jit
def _producer_kernel(x_ptr, w1_ptr, a_ptr, B, NI, K1, s_x, s_w1, s_a, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, ST1: tl.constexpr):  # fmt: skip
    _producer(tl.program_id(0), x_ptr, w1_ptr, a_ptr, a_ptr, B, NI, K1, s_x, s_w1, s_a, 1, False, UPCAST,
              BLOCK_M, BN1, BK1, ST1)  # fmt: skip


@triton.jit
def _consumer_kernel(a_ptr, w2_ptr, y_ptr, ws_ptr, cnt_ptr, B, N2, K2, s_a, s_w2, s_y, TILES2,
                     SPLIT: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BN2: tl.constexpr, BK2: tl.constexpr, ST2: tl.constexpr):  # fmt: skip
    _consumer(tl.program_id(0), a_ptr, w2_ptr, y_ptr, ws_ptr, cnt_ptr, cnt_ptr, B, N2, K2, s_a, s_w2, s_y, TILES2,
              1, False, SPLIT, UPCAST, BLOCK_M, BN2, BK2, ST2)  # fmt: skip


@triton.jit
def _fused_kernel(x_ptr, w1_ptr, a_ptr, w2_ptr, y_ptr, ws_ptr, cnt_ptr, done_ptr, tk_ptr,
                  B, NI, K1, N2, s_x, s_w1, s_a, s_w2, s_y, TILES1, TILES2, TILES_PER_SLICE,
                  SPLIT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                  BN1: tl.constexpr, BK1: tl.constexpr, ST1: tl.constexpr,
                  BN2: tl.constexpr, BK2: tl.constexpr, ST2: tl.constexpr, POLL: tl.constexpr):  # fmt: skip
    t = tl.atomic_add(tk_ptr, 1)  # the role: producers' tickets first (see the module docstring for why)
    if t == TILES1 + TILES2 * SPLIT - 1:  # the last ticket: every other one is taken, so back to 0 for the next launch
        tl.store(tk_ptr, 0)
    if t < TILES1:
        _producer(t, x_ptr, w1_ptr, a_ptr, done_ptr, B, NI, K1, s_x, s_w1, s_a, TILES_PER_SLICE, True, UPCAST,
                  BLOCK_M, BN1, BK1, ST1)  # fmt: skip
    else:
        u = t - TILES1
        _consumer(u, a_ptr, w2_ptr, y_ptr, ws_ptr, cnt_ptr, done_ptr, B, N2, NI, s_a, s_w2, s_y, TILES2,
                  TILES_PER_SLICE, True, SPLIT, UPCAST, BLOCK_M, BN2, BK2, ST2, POLL)  # fmt: skip
        # the slice's last consumer to finish (all of its consumers have passed the wait) resets its counter
        if tl.atomic_add(tk_ptr + 1 + u // TILES2, 1) == TILES2 - 1:
            tl.store(tk_ptr + 1 + u // TILES2, 0)
            tl.store(done_ptr + u // TILES2, 0)


class MLP:
    """One layer's gate/up and down weights, and the buffers of both forms (allocated before any capture)."""

    BM, BN, BK1, ST1 = 64, 64, 64, 4

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, batch: int, split: int = 2) -> None:
        self.w1, self.w2, self.split = w1, w2, split
        self.inter, self.hidden = w2.shape[1], w2.shape[0]
        if self.inter % (self.BN * split) or self.hidden % self.BN or batch > self.BM:
            raise ValueError(f"shapes {tuple(w1.shape)} {tuple(w2.shape)}, batch {batch}: not whole tiles")
        dev, dt = w1.device, w1.dtype
        self.tiles1, self.tiles2 = self.inter // self.BN, self.hidden // self.BN
        self.act = torch.empty(batch, self.inter, device=dev, dtype=dt)
        self.y = torch.empty(batch, self.hidden, device=dev, dtype=dt)
        self.ws = torch.empty(self.tiles2 * split * self.BN * self.BM, device=dev, dtype=torch.float32)
        self.cnt = torch.zeros(self.tiles2, device=dev, dtype=torch.int32)
        self.done = torch.zeros(split, device=dev, dtype=torch.int32)
        self.tk = torch.zeros(1 + split, device=dev, dtype=torch.int32)  # the ticket, each slice's finished
        self.meta: dict[str, dict] = {}
        self.upcast = dev.type == "cpu"

    def split_form(self, x: torch.Tensor, bk2: int = 128, st2: int = 5) -> torch.Tensor:
        b = x.shape[0]
        k = _producer_kernel[(self.tiles1,)](
            x, self.w1, self.act, b, self.inter, x.shape[1], x.stride(0), self.w1.stride(0), self.act.stride(0),
            self.upcast, self.BM, self.BN, self.BK1, self.ST1, num_warps=4,
        )  # fmt: skip
        self._record("producer", k)
        k = _consumer_kernel[(self.tiles2 * self.split,)](
            self.act, self.w2, self.y, self.ws, self.cnt, b, self.hidden, self.inter, self.act.stride(0),
            self.w2.stride(0), self.y.stride(0), self.tiles2, self.split, self.upcast, self.BM, self.BN, bk2, st2,
            num_warps=4,
        )  # fmt: skip
        self._record(f"consumer {bk2}/{st2}", k)
        return self.y

    def fused_form(self, x: torch.Tensor, bk2: int = 128, st2: int = 5, poll: int | None = None) -> torch.Tensor:
        """`poll`: 0 atomic reads, 1 acquire loads and pauses (the GPU's default), 2 no wait at all (a wrong result:
        what the fused launch costs without its waits)."""
        poll = (0 if self.upcast else 1) if poll is None else poll
        b = x.shape[0]
        k = _fused_kernel[(self.tiles1 + self.tiles2 * self.split,)](
            x, self.w1, self.act, self.w2, self.y, self.ws, self.cnt, self.done, self.tk,
            b, self.inter, x.shape[1], self.hidden, x.stride(0), self.w1.stride(0), self.act.stride(0),
            self.w2.stride(0), self.y.stride(0), self.tiles1, self.tiles2, self.inter // self.split // self.BN,
            self.split, self.upcast, self.BM, self.BN, self.BK1, self.ST1, self.BN, bk2, st2, poll, num_warps=4,
        )  # fmt: skip
        self._record(f"fused {bk2}/{st2}", k)
        return self.y

    def _record(self, name: str, k) -> None:
        """The compiled kernel's registers per thread and shared memory (what sets programs per SM)."""
        if name not in self.meta and hasattr(k, "n_regs"):
            self.meta[name] = dict(regs=k.n_regs, shared=k.metadata.shared)


def layers_chain(mlps: list[MLP], x: torch.Tensor, fn) -> torch.Tensor:
    """Layer l's output is layer l+1's input, as in the step."""
    for m in mlps:
        x = fn(m, x)
    return x


def reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    h = (x.float() @ w1.float().T).to(x.dtype).float()
    g, u = h.chunk(2, dim=-1)
    a = (torch.nn.functional.silu(g).to(x.dtype).float() * u).to(x.dtype)
    return (a.float() @ w2.float().T).to(x.dtype)


def check(mlp: MLP, x: torch.Tensor) -> dict:
    """``split`` and ``fused`` bit for bit equal, both near the float32 reference; twice (the counters reset)."""
    ref = reference(x, mlp.w1, mlp.w2).float()
    a = mlp.split_form(x).clone()
    out = {}
    for i in range(2):
        b = mlp.fused_form(x).clone()
        if not torch.equal(a, b):
            raise AssertionError(f"fused differs from split (launch {i}): max {(a.float() - b.float()).abs().max()}")
    err = ((a.float() - ref).norm() / ref.norm()).item()
    if err > 2e-2:
        raise AssertionError(f"relative error {err:.3g} against the float32 reference")
    out["rel_err"] = err
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,16,1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu-check", action="store_true", help="small shapes on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "dataflow_probe.json"))
    args = ap.parse_args()
    if args.cpu_check:
        g = torch.Generator().manual_seed(0)
        for batch in (1, 5, 64):
            w1 = torch.randn(2 * 256, 128, generator=g) / 128**0.5
            w2 = torch.randn(192, 256, generator=g) / 256**0.5
            x = torch.randn(batch, 128, generator=g)
            print(f"batch {batch}:", check(MLP(w1, w2, batch), x), flush=True)
        return
    dev = torch.device("cuda")
    hidden, inter = 4096, 14336
    g = torch.Generator(device=dev).manual_seed(0)
    w1 = [torch.randn(2 * inter, hidden, device=dev, dtype=torch.bfloat16, generator=g) / hidden**0.5
          for _ in range(LAYERS)]  # fmt: skip
    w2 = [torch.randn(hidden, inter, device=dev, dtype=torch.bfloat16, generator=g) / inter**0.5
          for _ in range(LAYERS)]  # fmt: skip
    bw = measure_copy_bw(dev)
    floor_us = (w1[0].numel() + w2[0].numel()) * 2 / bw * 1e6
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        mlps = [MLP(a, b, batch) for a, b in zip(w1, w2)]
        x0 = torch.randn(batch, hidden, device=dev, dtype=torch.bfloat16, generator=g)
        info = check(mlps[0], x0)

        def chain(fn, mlps=mlps, x0=x0):
            return lambda: layers_chain(mlps, x0, fn)

        forms = {"linear.py": chain(lambda m, x: decode_linear(swiglu_linear(x, m.w1, config=SWIGLU_CONFIG), m.w2))}
        for bk2, st2 in ((128, 5), (64, 5), (64, 3)):  # 160, 80 and 48 KB of the consumer's tiles in flight
            forms[f"split {bk2}/{st2}"] = chain(lambda m, x, c=(bk2, st2): m.split_form(x, *c))
            forms[f"fused {bk2}/{st2}"] = chain(lambda m, x, c=(bk2, st2): m.fused_form(x, *c))
        forms["fused 128/5 no wait"] = chain(lambda m, x: m.fused_form(x, poll=2))
        forms["fused 64/5 no wait"] = chain(lambda m, x: m.fused_form(x, 64, 5, poll=2))
        forms["fused 128/5 atomic"] = chain(lambda m, x: m.fused_form(x, poll=0))
        first = {name: f().clone() for name, f in forms.items()}  # compiled and equal before timing
        for name in forms:
            same = torch.equal(first[name], first["split 128/5"])
            if name.startswith("fused") and "no wait" not in name and not same:
                raise AssertionError(f"{name} differs from split after 32 layers at batch {batch}")
        med, times = time_rounds(forms, args.rounds)
        print(f"batch {batch}: " + "  ".join(f"{k} {v:6.2f}" for k, v in med.items())
              + f" us/layer (floor {floor_us:.2f})", flush=True)  # fmt: skip
        rows.append(dict(batch=batch, us_per_layer=med, all=times, floor_us=floor_us, kernels=mlps[0].meta, **info))
        print(mlps[0].meta, flush=True)
        del mlps, forms, first
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(dev), copy_bw_bytes_per_s=bw, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
