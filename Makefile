VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup prometheus demo lint test test-fast

$(PY):
	bash scripts/setup.sh

setup: $(PY)

# Opt-in, system-wide (apt-get, as root): the Prometheus server tests/test_observability.py runs.
prometheus:
	bash scripts/install_prometheus.sh

# The main job: serve SmolLM2-135M with ActTail through vLLM's OpenAI API and query it.
demo: $(PY)
	$(PY) -m acttail_vllm.dev.demo

# Style, as CI checks it before the tests (ruff's settings are in pyproject.toml).
lint: $(PY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Everything CI runs, on two workers, a test file per worker at a time, the files with slow tests
# first, each worker and the vLLM servers it starts pinned to its own core (tests/conftest.py).
test: $(PY)
	$(PY) -m pytest -q -rs -n 2 --dist loadfile --no-loadscope-reorder tests

# Without the tests that start vLLM servers.
test-fast: $(PY)
	$(PY) -m pytest -q -rs -m "not slow" tests
