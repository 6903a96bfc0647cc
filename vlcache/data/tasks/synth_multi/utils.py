"""lmms-eval hooks of synth_multi: four images in one prompt, "Which image shows the {colour} {shape}?",
accuracy on the image number (the first number of the reply)."""

from vlcache.data.hooks import doc_to_target, doc_to_text, doc_to_visual, number_accuracy  # noqa: F401

process_results = number_accuracy
