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

# Install the CPU build of torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# A suite that collects nothing exits 5 and fails the target: a vanished suite is a failure.
test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		echo "Note: no Chromium, so tests/test_browser.py skips; install it with: apt-get install -y chromium"
	$(PY) -m pytest -q -n 2 --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check keyspace tests benchmarks
	$(VENV)/bin/ruff format --check keyspace tests benchmarks

# The offline demo: collect keys and queries on CPython's own docs, report their key, query and
# score ranks, validate Loki in the paper's key basis and the query-aware basis.
demo: $(STAMP)
	$(VENV)/bin/keyspace collect --model smollm2-135m --dataset pydoc --out $(DEMO_RUN) --window 1024 --max-tokens 8192 --resume
	$(VENV)/bin/keyspace rank-report $(DEMO_RUN) --out $(DEMO_REPORT)
	$(VENV)/bin/keyspace validate --run $(DEMO_RUN) --d 32 --k 0.125 --basis key,query-aware --max-tokens 1024 --out $(DEMO_REPORT)/validate
	@echo
	@echo "Rank report:     $(CURDIR)/$(DEMO_REPORT)/index.html"
	@echo "Validate report: $(CURDIR)/$(DEMO_REPORT)/validate/validate.html"

clean:
	rm -rf $(VENV) runs reports
