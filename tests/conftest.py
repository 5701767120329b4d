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
