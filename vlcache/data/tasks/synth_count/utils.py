"""lmms-eval hooks of synth_count: one scene, "How many {colour} shapes are there?", accuracy on the first
number of the reply."""

from vlcache.data.metrics import first_number


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    pred = results[0] if results else ""
    return {"accuracy": float(first_number(pred) == doc["answer"])}
