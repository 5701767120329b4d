from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "profiles"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a cached safetensors directory (built once, ~30 s)."""
    from acttail_vllm.models import ensure_smollm2

    return ensure_smollm2()


def shipped_profile(method: str, percent: int) -> Path:
    return PROFILES / f"smollm2-135m-instruct-{method}-{percent}.json"


# The files that take minutes on the 2-core CI machine, longest first (2026-12-01). `make test`
# hands each xdist worker a file at a time, in collection order: started first, the long files no
# longer run alone at the end while the other worker idles.
LONGEST_FIRST = [
    "test_vllm_plugin.py", "test_kernels.py", "test_eval.py", "test_observability.py", "test_profiler_cli.py"
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: files stay whole
