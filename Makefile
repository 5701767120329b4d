VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast

$(PY):
	bash scripts/setup.sh

setup: $(PY)

# The main job: serve SmolLM2-135M with ActTail through vLLM's OpenAI API and query it.
demo: $(PY)
	$(PY) -m acttail_vllm.demo

# Everything CI runs (a few real vLLM servers on CPU: ~15 min on 2 cores).
test: $(PY)
	$(PY) -m pytest -q -rs tests

# Without the tests that start vLLM servers.
test-fast: $(PY)
	$(PY) -m pytest -q -rs -m "not slow" tests
