"""The fast decode path: the simple loop's prefill and compression, then decoding without per-step Python.

`generate_fast` returns what `vlcache.engine.generate.generate` returns, token for token:

1. prefill (SDPA) and `policy.compress(cache)`: the same code (`prefill_and_compress`);
2. static buffers, sized once: every cache layer is reserved to ``max kept + max_new_tokens`` entries per row
   (`CompressedLayer.reserve`), so appends write in place and never read lengths back to the host; the next
   token, the positions, the finished mask, the output ids and the write column are device tensors. Where the
   fused step runs with no per-token rule, each sequence gets its own capacity instead (its longest row of the
   layer + ``max_new_tokens``, rows packed end to end: `CompressedLayer.reserve_ragged`), so per-sequence
   budgets (VL-Cache) allocate what they keep rather than the batch's longest row for every sequence;
3. decode attention through the ragged Triton kernel, over each layer's, KV head's and sequence's own valid
   entries; for Llama-family language models the whole step runs as `FusedDecoder` (vlcache/engine/
   fused_decode.py: five or six launches per layer up to 16 sequences), for the others through the model's modules
   (`ForwardContext.fast_decode`);
4. on CUDA, one decode step (model forward, argmax, position increment, finished mask, token store) is run
   once as warm-up (it is decode step 1, and compiles the kernels), captured in a `torch.cuda.CUDAGraph`,
   and replayed for every later step. Sequences that finished keep running (they emit padding, as in the
   simple loop); the host checks "all finished" two steps behind the GPU (pinned flag + event), so the GPU
   never waits for the CPU, and the result is cut where the simple loop would have stopped.

Decode rules that evict per token (`acts_per_token`: h2o, fixed_point, rolling, when active, i.e. budget < 1)
reallocate and read lengths on the host inside `on_token`. Those that provide a graph-safe form of the update
(`prepare_static` + `on_token_static`, vlcache/policies/decode_rules.py: fixed-shape, in-place device ops on the
reserved buffers, on CUDA one to three Triton launches per layer from vlcache/kernels/rule_ops.py) run it inside
the captured step instead; any other such rule (or `graph_safe_rules=False`)
runs the same step eagerly (still with reserved buffers and the Triton kernel). On the CPU everything runs
eagerly, with the kernel's PyTorch fallback (the graph-safe updates included).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from vlcache.cache import CompressedCache
from vlcache.engine.attention import ForwardContext, forward_context
from vlcache.engine.fused_decode import FusedDecoder, unsupported_reason
from vlcache.engine.generate import GenerationOutput, build_output, prefill_and_compress
from vlcache.engine.timing import now_ms
from vlcache.policies.policy import Policy

log = logging.getLogger(__name__)

LAG = 2  # CUDA: the host reads the "all finished" flag of the step this many steps behind the last enqueued


def _evicts_per_token(policy: Policy) -> bool:
    rule = policy.decode_rule
    return bool(rule.acts_per_token and getattr(rule, "active", True))


def _graph_safe_rule(policy: Policy) -> bool:
    """Whether the decode rule has a graph-safe per-token update (`prepare_static` and `on_token_static`)."""
    rule = policy.decode_rule
    return callable(getattr(rule, "prepare_static", None)) and callable(getattr(rule, "on_token_static", None))


def _new_tokens(generated: list[list[int]], eos: int, ran: int, stop_at_eos: bool) -> int:
    """Steps the simple loop would have run: up to the column where the last sequence emitted EOS."""
    if not stop_at_eos:
        return ran
    firsts = [seq.index(eos) if eos in seq else None for seq in generated]
    if any(f is None for f in firsts):
        return ran
    return min(max(firsts) + 1, ran)


@torch.inference_mode()
def generate_fast(
    adapter,
    policy: Policy,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    *,
    cuda_graph: bool | None = None,
    stop_at_eos: bool = True,
    stats: dict | None = None,
    graph_safe_rules: bool = True,
    fused: bool | None = None,
    side_stream: bool = True,
) -> GenerationOutput:
    """Greedy decoding of a left-padded batch, as `generate`, on the fast path.

    Args:
        cuda_graph: capture and replay the decode step (default: on CUDA, unless the decode rule evicts per
            token and has no graph-safe update).
        stop_at_eos: False runs all `max_new_tokens` steps whatever is generated (benchmarks); the tokens are
            still cut at EOS.
        stats: filled by `decode_fast` with how decoding ran; `rule_update` says which per-token update ran
            ("static": the graph-safe one, "eager": `on_token`, None: the rule does not act per token).
        graph_safe_rules: use a per-token rule's graph-safe update when it has one, inside the captured step
            (checked on an H200: tests/test_fast_decode.py's gpu tests, and experiments/bench_decode.py's float32
            token check at real size); False runs the rule's eager `on_token` without a graph.
        fused: run each step through `FusedDecoder` (vlcache/engine/fused_decode.py: five or six launches per layer
            instead of transformers' fifty); None: where the model supports it, False: the model's own modules.
        side_stream: where a graph-safe rule offers it (H2O, on one GPU), its per-layer update runs on a second
            CUDA stream beside the step's next layers (vlcache/engine/side_stream.py); False: in line.
    """
    pre = prefill_and_compress(adapter, policy, inputs)
    use_graph, reason, on_reserved, update = cuda_graph, None, None, None
    if _evicts_per_token(policy):
        rule = policy.decode_rule
        if graph_safe_rules and _graph_safe_rule(policy):
            # the same update in fixed-shape, in-place device ops: it can be part of the captured step
            pre.ctx.on_decode = lambda layer_idx, query: rule.on_token_static(layer_idx, query, pre.cache)
            pre.ctx.decode_logits = getattr(rule, "attention_logits", None)  # H2O: the logits from the attention
            if hasattr(rule, "on_step_static"):  # FixedPoint: every layer's update in one launch, after the step
                pre.ctx.on_step = lambda: rule.on_step_static(pre.cache)  # (H2O: the join of its side stream)
            on_reserved, update = rule.prepare_static, "static"
            if getattr(rule, "overlap", False) and side_stream:  # H2O: its update beside the next layers
                on_reserved = functools.partial(rule.prepare_static, overlap=True)
        else:
            update = "eager"
            if cuda_graph is not False:
                use_graph = False
                reason = f"decode rule {type(rule).__name__} evicts per token (not graph-safe)"
    if stats is not None:
        stats["rule_update"] = update
    generated, new_tokens, t_end = decode_fast(
        adapter, pre.cache, pre.ctx, pre.logits.argmax(-1), pre.positions, max_new_tokens,
        t_start=pre.t_decode, cuda_graph=use_graph, eager_reason=reason, stop_at_eos=stop_at_eos, stats=stats,
        on_reserved=on_reserved, fused=fused,
    )
    return build_output(adapter, pre, generated, new_tokens, t_end - pre.t_decode)


@torch.inference_mode()
def decode_fast(
    adapter,
    cache: CompressedCache,
    ctx: ForwardContext,
    token: torch.Tensor,
    positions: torch.Tensor,
    max_new_tokens: int,
    *,
    t_start: float | None = None,
    cuda_graph: bool | None = None,
    eager_reason: str | None = None,
    stop_at_eos: bool = True,
    stats: dict | None = None,
    on_reserved: Callable[[CompressedCache], None] | None = None,
    fused: bool | None = None,
) -> tuple[list[list[int]], int, float]:
    """Greedy decoding from a filled (compressed) cache: `token` `[B]` is the first generated token (from the
    prefill's logits), `positions` `[B]` its position. Reserves the cache, then runs `max_new_tokens - 1`
    steps.

    Returns the ids per sequence (one per step, the first token included, cut where the simple loop stops),
    that count, and the host clock (ms) at the end. `stats` gets: `mode` ("graph" or "eager"), `reason` (why
    eager), `steps` (decode steps run), `setup_ms` (from `t_start`: reserve, warm-up step, capture),
    `loop_ms` and `loop_steps` (the steps after the first: the steady state), `kv_bytes_reserved` (the cache's
    storage once reserved), `kv_bytes_prompt_storage` (that, less the `max_new_tokens` entries of room per row),
    `layout` ("ragged": `reserve_ragged`, or "padded": `reserve`), `step` ("fused" or "modules") and
    `step_reason` (why not fused).
    `on_reserved(cache)` is called once after the buffers are reserved, before the first step (a graph-safe
    decode rule sizes its state to them there).
    """
    device = adapter.device
    cuda = device.type == "cuda"
    eos, pad = adapter.eos_token_id, adapter.pad_token_id
    info = {} if stats is None else stats
    t_start = now_ms(device) if t_start is None else t_start

    ctx.fast_decode = True
    why_not = "fused=False" if fused is False else unsupported_reason(adapter.model)
    if fused and why_not:
        raise ValueError(f"fused=True, but the fused decode step cannot run this model: {why_not}")
    decoder = None if why_not else FusedDecoder(adapter.model)
    info.update(step="modules" if decoder is None else "fused", step_reason=why_not)

    # -- static buffers, sized once --------------------------------------------------------------------------
    # ragged only where nothing but the fused step's kernels touches the cache: the module path and the
    # per-token rules index rows as [B, Hkv, capacity]
    ragged = decoder is not None and on_reserved is None and ctx.on_decode is None
    if ragged:
        for layer in cache.layers:
            layer.reserve_ragged(max_new_tokens)
    else:
        kept = torch.stack([layer.length.amax() for layer in cache.layers]).tolist()  # one host sync
        for layer, k in zip(cache.layers, kept):
            layer.reserve(int(k) + max_new_tokens)
    if decoder is not None:  # before on_reserved: a rule may keep pointers to the layers' counts
        seen = cache.share_seen()
    if on_reserved is not None:
        on_reserved(cache)
    # the entries reserved for generated tokens: max_new_tokens per row, in either layout
    room = sum(
        2 * layer.length.numel() * max_new_tokens * layer.keys.shape[-1] * layer.keys.element_size()
        for layer in cache.layers
    )
    info.update(kv_bytes_reserved=cache.nbytes(), layout="ragged" if ragged else "padded")
    info["kv_bytes_prompt_storage"] = info["kv_bytes_reserved"] - room

    token = token.clone()
    b = token.shape[0]
    finished = token == eos if stop_at_eos else torch.zeros_like(token, dtype=torch.bool)
    positions = positions.clone()
    out = torch.full((b, max(max_new_tokens, 1)), pad, dtype=torch.long, device=device)
    out[:, 0] = token
    col = torch.ones(1, dtype=torch.long, device=device)  # the column the next step writes
    done = torch.zeros((), dtype=torch.bool, device=device)

    def step() -> None:
        """One decode step, in place on the static buffers (what the graph captures)."""
        if decoder is None:
            logits = adapter.decode(token, positions, cache)
        else:
            seen.add_(1)
            for layer in cache.layers:  # the host count, for per-token rules run eagerly (sync_seen after graphs)
                layer.seen += 1
            logits = decoder(
                token, adapter.decode_position_ids(positions), cache, seen, ctx.on_decode, ctx.decode_logits
            )
        if ctx.on_step is not None:
            ctx.on_step()
        positions.add_(1)
        nxt = torch.where(finished, pad, logits.argmax(-1))
        if stop_at_eos:
            finished.logical_or_(nxt == eos)
            torch.all(finished, out=done)
        token.copy_(nxt)
        out.index_copy_(1, col, nxt[:, None])
        col.add_(1)

    steps = max(max_new_tokens - 1, 0)
    if stop_at_eos and steps and bool(finished.all()):
        steps = 0
    use_graph = cuda if cuda_graph is None else bool(cuda_graph) and cuda
    reason = None if use_graph else (eager_reason or ("not on CUDA" if not cuda else "cuda_graph=False"))

    # "all finished" flags, read `lag` steps behind so the host never drains the GPU's queue
    lag = LAG if cuda else 0
    flags = torch.zeros(steps + 1, dtype=torch.bool, pin_memory=cuda)
    events: dict[int, torch.cuda.Event] = {}

    def after(i: int) -> None:
        if not stop_at_eos:
            return
        flags[i].copy_(done, non_blocking=cuda)
        if cuda:
            events[i] = torch.cuda.Event()
            events[i].record()

    def should_stop(i: int) -> bool:
        """Before step i: did every sequence finish by step i - 1 - lag?"""
        j = i - 1 - lag
        if not stop_at_eos or j < 1:
            return False
        if cuda:
            events.pop(j).synchronize()
            for old in [e for e in events if e < j]:
                del events[old]
        return bool(flags[j])

    graph = None
    ran = 0
    loop_t0 = None
    with forward_context(ctx):
        if steps:
            if use_graph:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    step()  # decode step 1 doubles as the warm-up: kernels compiled, workspaces allocated
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                step()
            ran = 1
            after(1)
            if use_graph and steps > 1:
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        step()
                except Exception as err:  # noqa: BLE001  (anything not capturable: run eagerly instead)
                    log.warning("CUDA-graph capture of the decode step failed (%s); decoding eagerly", err)
                    graph, reason = None, f"capture failed: {type(err).__name__}: {err}"
            loop_t0 = now_ms(device)
            info["setup_ms"] = loop_t0 - t_start
            for i in range(2, steps + 1):
                if should_stop(i):
                    break
                if graph is not None:
                    graph.replay()
                else:
                    step()
                ran = i
                after(i)
    t_end = now_ms(device)
    for layer in cache.layers:
        layer.sync_seen()

    columns = ran + 1
    generated = [row[:columns] for row in out.tolist()]
    new_tokens = _new_tokens(generated, eos, columns, stop_at_eos)
    info.update(
        mode="graph" if graph is not None else "eager",
        reason=None if graph is not None else reason,
        steps=ran,
        loop_ms=(t_end - loop_t0) if loop_t0 is not None else 0.0,
        loop_steps=max(ran - 1, 0),
    )
    del graph  # frees the graph's memory pool with the function's buffers
    return [row[:new_tokens] for row in generated], new_tokens, t_end
