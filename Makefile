# Two entry points: `make demo` and `make test`. Each does every set-up step on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
DEMO_RUN := runs/demo-pydoc
DEMO_REPORT := reports/demo-pydoc

.PHONY: install demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Install the CPU build of torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects nothing; that is not a failure.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check keyspace tests benchmarks
	$(VENV)/bin/ruff format --check keyspace tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/keyspace collect --model smollm2-135m --dataset pydoc --out $(DEMO_RUN) --max-tokens 8192 --resume
	@echo "Demo run: $(DEMO_RUN)"

clean:
	rm -rf $(VENV) runs reports
