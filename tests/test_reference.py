"""Elastic Cache's protocol: perplexity of the full-cache answer under a compressed cache, by teacher forcing."""

import math

import pytest
import torch
from conftest import preset, random_images

from vlcache.engine.generate import generate
from vlcache.engine.reference import perplexity, reference_nll
from vlcache.policies.policy import build_policy

QUESTIONS = ["What is the total?", "Which colour is the largest shape in the picture, and where is it?", "Why?"]


def forward_nll(adapter, question: str, image, reference: list[int]) -> float:
    """float64 reference: one unpadded forward of prompt + reference through the plain model (SDPA)."""
    inputs = adapter.build_inputs([question], [[image]])
    ids = torch.cat([inputs["input_ids"], torch.tensor([reference])], 1)
    mask = torch.ones_like(ids)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    cfg = adapter.text_config
    saved, cfg._attn_implementation = cfg._attn_implementation, "sdpa"
    try:
        with torch.inference_mode():
            logits = adapter.model(input_ids=ids, attention_mask=mask, **extra).logits[0].double()
    finally:
        cfg._attn_implementation = saved
    m = inputs["input_ids"].shape[1]
    logp = torch.log_softmax(logits[m - 1 : m - 1 + len(reference)], -1)
    return -float(logp.gather(1, torch.tensor(reference)[:, None]).sum())


def test_full_cache_nll_equals_one_forward_over_prompt_and_reference(tiny_adapter):
    images = random_images(3)
    inputs = tiny_adapter.build_inputs(QUESTIONS, [[im] for im in images])  # left-padded, lengths differ
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    vocab = tiny_adapter.model.get_input_embeddings().weight.shape[0]
    # answer tokens: any id but the special ones (0-2) and the image placeholder, which in a forward over the
    # answer would ask the model for one more image
    ids = torch.tensor([t for t in range(3, vocab) if t != tiny_adapter.image_token_id])
    references = [ids[torch.randint(len(ids), (n,), generator=gen)].tolist() for n in (5, 1, 9)]  # ragged lengths
    got = reference_nll(tiny_adapter, build_policy(preset("full"), 1.0), inputs, references)
    for (nll, count), q, im, ref in zip(got, QUESTIONS, images, references):
        assert count == len(ref)
        assert nll == pytest.approx(forward_nll(tiny_adapter, q, im, ref), rel=1e-4, abs=1e-4)


def test_compression_changes_the_perplexity_of_the_full_answer(tiny_adapter, batch_inputs):
    full = generate(tiny_adapter, build_policy(preset("full"), 1.0), batch_inputs, 8)
    refs = full.tokens
    at_full = reference_nll(tiny_adapter, build_policy(preset("full"), 1.0), batch_inputs, refs)
    at_low = reference_nll(tiny_adapter, build_policy(preset("streamingllm"), 0.05), batch_inputs, refs)
    for ref, (a, n), (b, k) in zip(refs, at_full, at_low):
        assert n == k == len(ref)
        # 5% of the prompt kept: other logits, from the second token on (the first is scored from the prefill's
        # logits, which come before compression: a one-token answer has the same NLL at any budget)
        assert a != b or n <= 1
    assert all(perplexity(a, n) >= 1.0 for a, n in at_full if n)


def test_empty_and_mismatched_references(tiny_adapter, batch_inputs):
    out = reference_nll(tiny_adapter, build_policy(preset("full"), 1.0), batch_inputs, [[], [5]])
    assert out[0] == (0.0, 0) and out[1][1] == 1 and out[1][0] > 0
    assert perplexity(0.0, 0) is None and perplexity(math.log(4.0) * 3, 3) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="1 references for a batch of 2"):
        reference_nll(tiny_adapter, build_policy(preset("full"), 1.0), batch_inputs, [[5]])


def test_the_jobs_full_reference_is_the_full_preset():
    from vlcache.eval.job import FULL_POLICY

    assert FULL_POLICY == preset("full")


def test_reference_metrics_job(tmp_path):
    """`reference_metrics=true`: every sample is scored against the full cache's answer, which is what a `full`
    job answers; a `full` job agrees with itself fully."""
    import json

    from conftest import run_cli
    from fixture_task import write_fixture_task

    tasks = write_fixture_task(tmp_path / "tasks", n=5)
    args = ["-m", "policy=full,streamingllm", "budget=0.2", "reference_metrics=true", f"dataset.task_dir={tasks}",
            "dataset.task=fixture_qa", "dataset.name=fixture_qa", "dataset.metric=exact_match", "model=tiny_random",
            f"output_root={tmp_path}", "sweep_name=s"]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = {dict(kv.split("=") for kv in p.name.split(","))["policy"]: p
            for p in (tmp_path / "sweeps" / "s").iterdir() if p.is_dir()}
    rows = {name: [json.loads(line) for line in (job / "samples.jsonl").read_text().splitlines()]
            for name, job in jobs.items()}
    metrics = {name: json.loads((job / "metrics.json").read_text()) for name, job in jobs.items()}
    full_answers = [r["answer"] for r in rows["full"]]
    assert [r["full_answer"] for r in rows["streamingllm"]] == full_answers
    assert all(r["rouge_l_vs_full"] == 1.0 for r in rows["full"])
    assert metrics["full"]["reference_metrics"]["rouge_l_vs_full"] == 1.0
    ref = metrics["streamingllm"]["reference_metrics"]
    assert 0.0 <= ref["rouge_l_vs_full"] <= 1.0 and ref["ppl_vs_full"] >= 1.0
    ppl = [r["ppl_vs_full"] for r in rows["streamingllm"] if r["ppl_vs_full"] is not None]
    assert ref["ppl_vs_full"] == pytest.approx(sum(ppl) / len(ppl))
