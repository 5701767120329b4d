VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast

$(PY):
	bash scripts/setup.sh

setup: $(PY)

# The main job: serve SmolLM2-135M with ActTail through vLLM's OpenAI API and query it.
demo: $(PY)
	$(PY) -m acttail_vllm.demo

# Everything CI runs, on two workers, a test file per worker at a time (a few real vLLM servers on
# CPU: 25 min on 2 cores, 33 in one process; install included, .ci/run takes 28).
test: $(PY)
	$(PY) -m pytest -q -rs -n 2 --dist loadfile tests

# Without the tests that start vLLM servers.
test-fast: $(PY)
	$(PY) -m pytest -q -rs -m "not slow" tests
