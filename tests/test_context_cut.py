"""LOOK-M's prompt cut (vlcache/data/context_cut.py) on awkward inputs, hand-counted with a word tokenizer (one
token per word), and the model's own image-token counts it uses. The run through run.py is in test_milebench.py."""

import pytest
from PIL import Image

from vlcache.data import milebench as mb
from vlcache.data.context_cut import cut_context, cut_prompt, join_context, split_context
from vlcache.eval.lmms_model import VLCacheLMM, image_token_count
from vlcache.models.tiny import FAMILIES, build_tiny


def words(text):
    return text.split()


def unwords(tokens):
    return " ".join(tokens)


def cut(chunks, max_len, instruction_tokens=0, image_tokens=3):
    return cut_context(chunks, instruction_tokens, max_len, words, unwords, image_tokens)


def test_text_only_the_last_fragment_is_cut_from_the_left():
    out = cut(["a b c d e f"], max_len=6, instruction_tokens=2)  # 4 tokens of room
    assert out.chunks == ["c d e f"] and out.dropped_text_tokens == 2 and out.dropped_images == 0
    # an earlier fragment that does not fit goes whole: only the context's last chunk is ever cut
    out = cut(["a b", "c d e"], max_len=4)
    assert out.chunks == ["c d e"] and out.dropped_text_tokens == 2


def test_image_only_keeps_the_last_images_that_fit():
    out = cut([0, 1, 2], max_len=7)  # 3 tokens each: two fit
    assert out.chunks == [1, 2] and out.dropped_images == 1 and out.dropped_text_tokens == 0
    assert cut([0, 1, 2], max_len=2).chunks == []  # not one fits, and an image is never cut


def test_last_text_too_long_drops_every_image_before_it():
    out = cut([0, " ".join(f"w{i}" for i in range(1, 11))], max_len=4)
    assert out.chunks == ["w7 w8 w9 w10"] and out.dropped_text_tokens == 6 and out.dropped_images == 1


def test_exact_fit_at_the_boundary():
    chunks = [0, "a b", 1, "c d"]  # 3 + 2 + 3 + 2 = 10 tokens
    assert cut(chunks, max_len=10).chunks == chunks
    assert cut(chunks, max_len=11, instruction_tokens=1).chunks == chunks
    out = cut(chunks, max_len=9)  # one short of the first image
    assert out.chunks == ["a b", 1, "c d"] and out.dropped_images == 1 and out.dropped_text_tokens == 0
    assert cut(chunks, max_len=7).chunks == ["a b", 1, "c d"]  # exactly the three last chunks
    out = cut(chunks, max_len=6)  # "a b" one token over: dropped whole, not cut
    assert out.chunks == [1, "c d"] and out.dropped_text_tokens == 2 and out.dropped_images == 1


def test_the_walk_stops_at_the_first_chunk_that_does_not_fit():
    # "a" would fit after the image is skipped, but LOOK-M breaks at the image: nothing before it is kept
    out = cut(["a", 0, "d"], max_len=3)
    assert out.chunks == ["d"] and out.dropped_text_tokens == 1 and out.dropped_images == 1


def test_images_are_never_split():
    # a last image larger than the room: nothing kept (no partial image, and no text before it)
    out = cut(["x y", 0], max_len=4, image_tokens=5)
    assert out.chunks == [] and out.dropped_images == 1 and out.dropped_text_tokens == 2
    # room left after the text but less than an image: the image goes whole
    out = cut([0, "p q"], max_len=4)
    assert out.chunks == ["p q"] and out.dropped_images == 1


def test_instruction_alone_over_the_limit_keeps_no_context():
    """With no room left (instruction of max_len tokens or more), nothing of the context is kept; the prompt is
    the instruction alone. LOOK-M's slice ids[-budget:] would keep the whole last fragment at a budget of 0."""
    for instruction_tokens in (10, 12):
        out = cut([0, "a b", 1, "c d e"], max_len=10, instruction_tokens=instruction_tokens)
        assert out.chunks == [] and out.dropped_text_tokens == 5 and out.dropped_images == 2


def test_each_image_its_own_count():
    out = cut_context([0, "a", 1, "b"], 0, 7, words, unwords, image_tokens=lambda i: [1, 5][i])
    assert out.chunks == ["a", 1, "b"] and out.dropped_images == 1  # 1 + 5 + 1 = 7; image 0 one over
    assert cut_context([0, "a", 1, "b"], 0, 8, words, unwords, lambda i: [1, 5][i]).chunks == [0, "a", 1, "b"]


def test_split_and_join_follow_the_adapters_layout():
    assert split_context("A <image>B<image>", 2) == (["A ", 0, "B", 1], True)
    assert split_context("<image><image>Q", 2) == ([0, 1, "Q"], True)  # empty fragments are not chunks
    assert split_context("Q?", 2) == ([0, 1, "Q?"], False)  # no place named: the images go first
    with pytest.raises(ValueError, match="2 <image> places for 3"):
        split_context("<image><image>", 3)
    assert join_context(["A ", 0, "B", 1], True) == "A <image>B<image>"
    assert join_context([1, "Q?"], False) == "Q?"


def test_cut_prompt_keeps_the_instruction_and_the_images_of_the_kept_places():
    prompt = "Do it.\nA <image> B <image> Q?"  # context chunks: 1, image, 1, image, 1 tokens
    out = cut_prompt(prompt, 2, 7, words, unwords, 3, instruction="Do it.")  # 2 + (1 + 3 + 1) fits, not image 0
    assert out.prompt == "Do it.\n B <image> Q?" and out.images == [1]
    assert out.dropped_text_tokens == 1 and out.dropped_images == 1
    assert out.prompt.count("<image>") == len(out.images)
    whole = cut_prompt(prompt, 2, 11, words, unwords, 3, instruction="Do it.")
    assert whole.prompt == prompt and whole.images == [0, 1] and whole.dropped_images == 0
    # images first (no place named): the first images go first
    out = cut_prompt("look\nwhich one?", 3, 9, words, unwords, 3, instruction="look")
    assert out.prompt == "look\nwhich one?" and out.images == [1, 2] and out.dropped_images == 1
    with pytest.raises(ValueError, match="does not start with its instruction"):
        cut_prompt("other\nQ", 0, 9, words, unwords, instruction="look")


def test_only_milebench_docs_keep_an_instruction():
    doc = {"dataset": "ALFRED", "instruction": "Plan.", "context": "{image#1} next?", "images": ["a.png"]}
    assert mb.kept_instruction(doc) == "Plan."
    assert mb.kept_instruction(dict(doc, dataset="docvqa")) == ""
    assert mb.kept_instruction({"question": "What?", "instruction": "Answer."}) == ""


@pytest.mark.parametrize("family", FAMILIES)
def test_image_token_count_is_what_the_processor_expands(family):
    model, processor = build_tiny(family, 0)
    for size in [(40, 40), (120, 50), (30, 90)]:
        image = Image.new("RGB", size)
        ids = processor(text=[processor.image_token], images=[image], return_tensors="pt")["input_ids"]
        assert image_token_count(processor, image) == int((ids == model.config.image_token_id).sum())


def test_image_token_count_falls_back_to_lookm_576():
    assert image_token_count(object(), Image.new("RGB", (10, 10))) == 576


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "4096"])
def test_max_context_len_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="max_context_len must be a positive number of tokens"):
        VLCacheLMM(None, None, max_context_len=bad)


def test_lookm_paper_cuts_at_4096_and_the_default_does_not():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        assert compose("config").max_context_len is None
        assert compose("config", overrides=["experiment=lookm_paper"]).max_context_len == 4096


def test_prompts_past_the_positions_fail_unless_allowed():
    """A prompt plus its new tokens past the model's positions: `PromptTooLong` by default; with
    `allow_past_positions` (lookm_paper: LOOK-M's runs go on past LLaVA-1.5's 4,096) it runs."""
    from conftest import random_images

    from vlcache.engine.generate import generate
    from vlcache.models.adapter import LlavaAdapter, PromptTooLong
    from vlcache.policies.policy import build_policy
    from vlcache.zoo.model import build_random_llava

    model, processor = build_random_llava(seed=0)
    adapter = LlavaAdapter(model, processor, "cpu")
    adapter.text_config.max_position_embeddings = 600  # the prompt is ~590 tokens (576 image tokens)
    images = [random_images(1)]
    with pytest.raises(PromptTooLong, match="exceeds the model's 600 positions"):
        adapter.build_inputs(["What is the total?"], images, max_new_tokens=32)
    inputs = adapter.build_inputs(["What is the total?"], images, max_new_tokens=32, allow_past_positions=True)
    full = {"name": "full", "scorer": {"name": "recency"}, "allocator": {"name": "uniform"}, "sinks": 0, "recent": 0,
            "keep_all": True, "reducer": {"name": "evict"}, "decode": {"name": "append"}, "granularity": "kv_head",
            "postvision_fallback": False}
    out = generate(adapter, build_policy(full, 1.0), inputs, 32)
    assert out.prompt_tokens[0] + out.new_tokens > 600


def test_allow_past_positions_must_be_a_bool(tiny_adapter):
    from vlcache.eval.lmms_model import VLCacheLMM
    from vlcache.policies.policy import build_policy

    pol = build_policy({"name": "full", "scorer": {"name": "recency"}, "allocator": {"name": "uniform"}, "sinks": 0,
                        "recent": 0, "keep_all": True, "reducer": {"name": "evict"}, "decode": {"name": "append"},
                        "granularity": "kv_head", "postvision_fallback": False}, 1.0)
    with pytest.raises(ValueError, match="allow_past_positions must be true or false, got 'yes'"):
        VLCacheLMM(adapter=tiny_adapter, policy=pol, allow_past_positions="yes")
