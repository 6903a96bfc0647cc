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

sweep: $(STAMP)
	$(PY) run.py -m experiment=demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q
	$(PY) -m ruff check .

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf outputs multirun
