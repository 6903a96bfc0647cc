"""Scoring helpers shared by the embedded tasks' `utils.py` (lmms-eval `process_results` and aggregations).

ANLS is lmms-eval's own (`lmms_eval.api.metrics.anls`); CIDEr is pycocoevalcap's, behind the PTB tokenizer,
as lmms-eval's COCO caption tasks compute it (both need `java` on PATH).
"""

from __future__ import annotations

import re


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces or trailing full stop."""
    return " ".join(text.strip().lower().split()).rstrip(".").strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def first_number(text: str) -> str:
    """The first integer in a reply ("3", "3 shapes", "image 3"), or "" when there is none."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def anls(prediction: str, references: list[str]) -> float:
    """lmms-eval's ANLS on the whitespace-collapsed prediction. lmms-eval divides the edit distance of the
    collapsed strings by the raw lengths, so a reply of blanks would score up to 1 - len(ref)/len(reply)."""
    from lmms_eval.api.metrics import anls as lmms_anls

    pred = " ".join(prediction.split())
    return float(lmms_anls(references=list(references), predictions=[pred])["anls"])


def cider(items: list[dict]) -> float:
    """Corpus CIDEr-D over items {"image_id", "answer": [references], "pred"}: lmms-eval's coco_cap recipe."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {it["image_id"]: [{"caption": a} for a in it["answer"]] for it in items}
    res = {it["image_id"]: [{"caption": it["pred"]}] for it in items}
    tokenizer = PTBTokenizer()
    score, _ = Cider().compute_score(tokenizer.tokenize(gts), tokenizer.tokenize(res))
    return float(score)
