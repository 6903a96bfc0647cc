"""lmms-eval hooks of milebench_t4 (vlcache/data/milebench.py): MileBench
column T-4 (CounterfactualInference, StateChange, CharacterOrder, SceneTransition)."""

from vlcache.data.milebench import (  # noqa: F401
    dataset_mean,
    doc_to_target,
    doc_to_text,
    doc_to_visual,
    docs_loader,
    process_results,
)

process_docs = docs_loader(['CounterfactualInference', 'StateChange', 'CharacterOrder', 'SceneTransition'])
