"""lmms-eval hooks of synth_count: one scene, "How many {colour} shapes are there?", accuracy on the first
number of the reply."""

from vlcache.data.hooks import doc_to_target, doc_to_text, doc_to_visual, number_accuracy  # noqa: F401

process_results = number_accuracy
