"""The lmms-eval model wrapper: answers lmms-eval's generation requests with vlcache's engine.

lmms-eval 0.7.3 looks `--model` names up in its own registry, so vlcache passes an instance of this class to
`simple_evaluate` (ecosystem.md). `clean()` is overridden: lmms-eval calls it after every evaluation and the
default deletes the model, which a sweep reuses across jobs in one process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cache

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from vlcache.data import milebench
from vlcache.data.context_cut import LOOKM_IMAGE_TOKENS, cut_prompt
from vlcache.engine.generate import GenerationOutput, generate
from vlcache.engine.reference import perplexity, reference_nll
from vlcache.models.adapter import IMAGE_PLACE
from vlcache.policies.policy import Policy

log = logging.getLogger(__name__)


@dataclass
class BatchRecord:
    """One engine batch: what metrics.json aggregates."""

    size: int
    output: GenerationOutput


@dataclass
class SampleRecord:
    """What samples.jsonl keeps per sample beyond lmms-eval's own fields."""

    prompt_tokens: int
    image_tokens: int
    kept_tokens: float  # mean kept prompt entries over layers and KV heads
    generated_tokens: int
    batch_prefill_ms: float
    batch_decode_ms_per_token: float
    batch_e2e_ms: float
    # reference_metrics (Elastic Cache's protocol): the full cache's answer, the perplexity of its tokens under
    # this job's compressed cache (teacher forcing), and the ROUGE-L F1 of this job's answer against it
    full_answer: str | None = None
    ppl_vs_full: float | None = None
    rouge_l_vs_full: float | None = None
    # max_context_len (LOOK-M's prompt cut): the context's text tokens and images the cut dropped
    cut_text_tokens: int | None = None
    cut_images: int | None = None


@dataclass
class _Sample:
    """One request, prepared: its images loaded, or the error that fails it alone."""

    key: tuple[str, int]  # (task, doc_id)
    question: str
    images: list = field(default_factory=list)
    error: Exception | None = None
    cut: tuple[int, int] | None = None  # (text tokens, images) dropped by the prompt cut


@dataclass
class VLCacheLMM(lmms):
    adapter: object
    policy: Policy
    batch_size: int = 8
    max_new_tokens: int | None = None  # overrides the task's generation length when set
    engine: str = "simple"  # "fast": vlcache.engine.fast_decode (CUDA graphs) instead of the eager loop
    reference_policy: Policy | None = None  # the full cache: set to score every answer against its answer
    max_context_len: int | None = None  # LOOK-M's prompt cut (vlcache/data/context_cut.py); None: no cut
    allow_past_positions: bool = False  # prompts + new tokens may run past the model's positions (LOOK-M's runs)
    batches: list[BatchRecord] = field(default_factory=list)
    samples: dict[tuple[str, int], SampleRecord] = field(default_factory=dict)
    failures: dict[tuple[str, int], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()
        n = self.max_context_len
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"max_context_len must be a positive number of tokens or null, got {n!r}")
        if not isinstance(self.allow_past_positions, bool):
            raise ValueError(f"allow_past_positions must be true or false, got {self.allow_past_positions!r}")

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def clean(self) -> None:
        """Keeps the model (lmms-eval's default deletes every module attribute)."""

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = [""] * len(requests)
        for start in range(0, len(requests), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(requests))))
            texts = self._generate_batch([requests[i] for i in chunk])
            for i, text in zip(chunk, texts):
                answers[i] = text
        return answers

    def _generate_batch(self, reqs: list[Instance]) -> list[str]:
        """Generates a batch; a batch that fails is retried one sample at a time, so that one bad sample
        (corrupt image, over-long prompt, out of memory) costs only itself: it is recorded and answered ''."""
        gen_kwargs = reqs[0].args[1]
        max_new = self.max_new_tokens or int(gen_kwargs.get("max_new_tokens", 32))
        until = gen_kwargs.get("until")
        samples = [self._prepare(req) for req in reqs]
        ready = [s for s in samples if s.error is None]
        try:
            answers = self._run(ready, max_new, until)
        except Exception as exc:  # noqa: BLE001 - any failure is retried per sample
            answers = {}
            _free_memory()
            if len(ready) == 1:
                ready[0].error = exc
            else:
                log.warning("batch of %d failed (%s): retrying one sample at a time", len(ready), exc)
                for sample in ready:
                    try:
                        answers.update(self._run([sample], max_new, until))
                    except Exception as one_exc:  # noqa: BLE001
                        _free_memory()
                        sample.error = one_exc
        for sample in samples:
            if sample.error is not None:
                log.warning("sample %s failed: %s: %s", sample.key, type(sample.error).__name__, sample.error)
                self.failures[sample.key] = f"{type(sample.error).__name__}: {sample.error}"
                answers[sample.key] = ""
        return [answers[sample.key] for sample in samples]

    def _prepare(self, req: Instance) -> _Sample:
        """Loads a sample's images, which can fail on their own, and cuts its prompt (`max_context_len`)."""
        context, _, doc_to_visual, doc_id, task, split = req.args
        sample = _Sample(key=(task, doc_id), question=context)
        doc = self.task_dict[task][split][doc_id]
        try:
            sample.images = list(doc_to_visual(doc) or [])
            for im in sample.images:
                im.load()
        except Exception as exc:  # noqa: BLE001 - a corrupt image fails its sample only
            missing = [k for k, v in doc.items() if v is None or (isinstance(v, list) and None in v)]
            # safe_images turned an undecodable image into None: say so rather than the hook's AttributeError
            sample.error = ValueError(f"undecodable image in column(s) {', '.join(missing)}") if missing else exc
            sample.images = []
        if self.max_context_len is not None and sample.error is None:
            try:
                self._cut_context(sample, doc)
            except ValueError as exc:  # a prompt whose image places do not match its images fails alone
                sample.error = exc
        return sample

    def _cut_context(self, sample: _Sample, doc: dict) -> None:
        """LOOK-M's prompt cut: a MileBench task instruction kept whole, the context cut to the tokens left of
        `max_context_len`, walked from its end, images whole (each its own token count); the images it drops
        leave the model's visuals too."""
        tok, processor = self.adapter.processor.tokenizer, self.adapter.processor
        cut = cut_prompt(
            sample.question,
            len(sample.images),
            self.max_context_len,
            tokenize=lambda text: tok(text, add_special_tokens=False).input_ids,
            detokenize=tok.decode,
            image_tokens=lambda i: image_token_count(processor, sample.images[i]),
            instruction=milebench.kept_instruction(doc),
            place=IMAGE_PLACE,
        )
        sample.question = cut.prompt
        sample.images = [sample.images[i] for i in cut.images]
        sample.cut = (cut.dropped_text_tokens, cut.dropped_images)

    def _run(self, samples: list[_Sample], max_new: int, until) -> dict[tuple[str, int], str]:
        if not samples:
            return {}
        inputs = self.adapter.build_inputs(
            [s.question for s in samples], [s.images for s in samples], max_new, self.allow_past_positions
        )
        if self.engine == "fast":
            from vlcache.engine.fast_decode import generate_fast

            out = generate_fast(self.adapter, self.policy, inputs, max_new)
        else:
            out = generate(self.adapter, self.policy, inputs, max_new)
        decode = self.adapter.processor.tokenizer.batch_decode
        texts = [_cut_at_stop(t, until).strip() for t in decode(out.tokens, skip_special_tokens=True)]
        self.batches.append(BatchRecord(size=len(samples), output=out))
        kept = out.report.keep_counts.double().mean((0, 2))
        reference = [{} for _ in samples]
        if self.reference_policy is not None:
            full = generate(self.adapter, self.reference_policy, inputs, max_new)
            full_texts = decode(full.tokens, skip_special_tokens=True)
            nll = reference_nll(self.adapter, self.policy, inputs, full.tokens)
            for b, ref in enumerate(reference):
                ref["full_answer"] = _cut_at_stop(full_texts[b], until).strip()
                ref["ppl_vs_full"] = perplexity(*nll[b])
                ref["rouge_l_vs_full"] = rouge_l(texts[b], ref["full_answer"])
        answers = {}
        for b, sample in enumerate(samples):
            answers[sample.key] = texts[b]
            self.samples[sample.key] = SampleRecord(
                **reference[b],
                prompt_tokens=out.prompt_tokens[b],
                image_tokens=out.image_tokens[b],
                kept_tokens=float(kept[b]),
                generated_tokens=len(out.tokens[b]),
                batch_prefill_ms=out.prefill_ms,
                batch_decode_ms_per_token=out.decode_ms_per_token,
                batch_e2e_ms=out.e2e_ms,
                cut_text_tokens=sample.cut[0] if sample.cut else None,
                cut_images=sample.cut[1] if sample.cut else None,
            )
        return answers

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError("vlcache evaluates generation tasks only (output_type: generate_until)")

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError("vlcache evaluates single-round generation tasks only")


def image_token_count(processor, image) -> int:
    """The tokens the model's processor gives `image` (its count for the image's size: fixed for LLaVA-1.5, 576
    at 336 px); LOOK-M's 576 for a processor that cannot say."""
    try:
        counts = processor._get_num_multimodal_tokens(image_sizes=[(image.height, image.width)])
        return int(counts["num_image_tokens"][0])
    except (AttributeError, KeyError, TypeError, NotImplementedError):
        return LOOKM_IMAGE_TOKENS


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004) of `answer` against `reference`, as Google's rouge-score computes it (Elastic
    Cache's ROUGE-L F1); equal strings agree fully, also when they hold no word rouge-score counts."""
    if answer.strip() == reference.strip():
        return 1.0
    return _rouge_l_scorer().score(reference, answer)["rougeL"].fmeasure


@cache
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def _cut_at_stop(text: str, until) -> str:
    if not until:
        return text
    for stop in [until] if isinstance(until, str) else until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text
