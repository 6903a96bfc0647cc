"""scripts/make_figures.py picks the embedded tasks whose data ships in the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_figures_sweep_only_the_shipped_tasks():
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the MileBench configs are local lmms-eval tasks too, but their data is the user's (dataset.path)
    assert (ROOT / "conf" / "dataset" / "milebench_alfred.yaml").exists()
    assert module.embedded_datasets() == ["synth_caption", "synth_count", "synth_docvqa", "synth_multi"]
