"""lmms-eval hooks of synth_caption: one scene, "Describe the image.", CIDEr over the split (pycocoevalcap,
as lmms-eval's COCO caption tasks) and exact match against the canonical caption."""

from vlcache.data.hooks import doc_to_target, doc_to_text, doc_to_visual  # noqa: F401
from vlcache.data.metrics import cider, exact_match


def process_results(doc, results):
    pred = results[0] if results else ""
    image_id = int(doc["id"].rsplit("_", 1)[-1])
    return {
        "cider": {"image_id": image_id, "answer": list(doc["answers"]), "pred": pred},
        "exact_match": exact_match(pred, doc["answer"]),
    }


def cider_aggregation(items):
    return cider(items)
