"""lmms-eval hooks of milebench_t3 (vlcache/data/milebench.py): MileBench
column T-3 (EgocentricNavigation, MovingDirection)."""

from vlcache.data.milebench import (  # noqa: F401
    dataset_mean,
    doc_to_target,
    doc_to_text,
    doc_to_visual,
    docs_loader,
    process_results,
)

process_docs = docs_loader(['EgocentricNavigation', 'MovingDirection'])
