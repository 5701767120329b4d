"""A short soak (``benchmarks/soak.py``): a CPU vllm serve of SmolLM2 with ActTail's defaults under a
streaming load with cancelled streams, then SIGTERM; every check of the full soak must hold."""

import pytest

from benchmarks.soak import SoakSpec, format_table, soak

pytestmark = pytest.mark.slow


def test_short_soak_passes_every_check(smollm2_dir):
    spec = SoakSpec(requests=120, concurrency=16, prompt_tokens=(8, 32), max_tokens=(2, 8), baseline_after=40)
    result = soak(str(smollm2_dir), spec)
    assert result.passed, format_table(result)
    assert sum(s.outcome == "cancelled" for s in result.streams) > 0
