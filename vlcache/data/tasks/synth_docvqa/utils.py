"""lmms-eval hooks of synth_docvqa: one form image, the question alone (the model wrapper adds the chat
format and image tokens), ANLS against the field's value."""

from vlcache.data.hooks import doc_to_target, doc_to_text, doc_to_visual  # noqa: F401
from vlcache.data.metrics import anls


def process_results(doc, results):
    return {"anls": anls(results[0] if results else "", doc["answers"])}
