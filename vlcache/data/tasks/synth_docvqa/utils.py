"""lmms-eval hooks of synth_docvqa: one form image, the question alone (the model wrapper adds the chat
format and image tokens), ANLS against the field's value."""

from vlcache.data.metrics import anls


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    return {"anls": anls(results[0] if results else "", doc["answers"])}
