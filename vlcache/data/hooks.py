"""lmms-eval hooks shared by the embedded tasks: every task's `utils.py` re-exports these, since a task YAML
names its hooks as `!function utils.<name>` relative to its own folder."""

from __future__ import annotations

from PIL import Image

from vlcache.data.metrics import first_number


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The sample's image(s), RGB: one `image` or a list `images` (multi-image prompts)."""
    images = doc["images"] if "images" in doc else [doc["image"]]
    return [im.convert("RGB") for im in images]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    """The question alone: the model wrapper adds the chat format and the image tokens."""
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def number_accuracy(doc: dict, results: list[str]) -> dict[str, float]:
    """Accuracy on the first number of the reply (counts, image numbers)."""
    pred = results[0] if results else ""
    return {"accuracy": float(first_number(pred) == doc["answer"])}
