# Two entry points: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both build .venv from nothing first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test sweep lint env clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh

env: $(STAMP)

demo: $(STAMP)
	$(PY) run.py

# The embedded accuracy-vs-budget sweep (every preset, budgets 1%..100%, four tasks; resumable), then its
# figures: outputs/sweeps/demo/figures/accuracy_vs_budget.png and the other notebooks' PNGs.
sweep: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) run.py -m experiment=demo
	$(PY) scripts/make_figures.py --skip-sweep --results outputs/sweeps/demo --figures outputs/sweeps/demo/figures

# Triton kernels run on the CPU through the interpreter (slowly): only their own tests ask for it; every
# other test reaches the scoring core's PyTorch form. HF_HUB_OFFLINE: no test may touch the network.
KERNEL_TESTS := tests/test_scores.py tests/test_decode_attention.py tests/test_fused_ops.py tests/test_rule_ops.py tests/test_linear.py tests/test_fused_prefill.py

test: $(STAMP)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q $(addprefix --ignore=,$(KERNEL_TESTS))
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q $(KERNEL_TESTS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf outputs multirun

# Regenerates results/embedded (a small CPU sweep of the embedded model) and executes every notebook,
# which writes its figure into figures/ (scripts/make_figures.py).
.PHONY: figures
figures: $(STAMP)
	$(PY) scripts/make_figures.py
