import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "profiles"
#: A shipped SmolLM2 profile in schema version 1, whose "acttail" is today's alphapruning rule.
SCHEMA1_PROFILE = REPO / "tests" / "data" / "smollm2-135m-instruct-acttail-50.schema1.json"


def pytest_configure(config) -> None:
    """Under pytest-xdist, give each worker its own CPUs, for its PyTorch threads and for the vLLM
    servers its tests start (they inherit the affinity and VLLM_CPU_OMP_THREADS_BIND). Unpinned, a
    serving vLLM's OpenMP threads spin on every core and starve the other worker: on 2 cores the
    SmolLM2 multiple-choice test took 352 s beside a server against 31 s alone."""
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    cpus = sorted(os.sched_getaffinity(0))
    if worker is None or workers is None or len(cpus) < int(workers):
        return
    import torch

    own = cpus[int(worker.removeprefix("gw")) :: int(workers)]
    os.sched_setaffinity(0, own)
    torch.set_num_threads(len(own))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, own))


def pytest_collection_modifyitems(config, items) -> None:
    """Files with slow tests first (order within a file kept). Under ``--dist loadfile
    --no-loadscope-reorder`` the files that start vLLM servers then start first and the quick files
    fill in at the end, instead of a server file, queued last, running alone on one core."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a cached safetensors directory (built once, ~30 s)."""
    from acttail_vllm.dev.models import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family) -> the directory of that family's tiny random-weight checkpoint
    (tests/tiny_models.py), built on first use in this process."""
    from tests import tiny_models

    root, built = tmp_path_factory.mktemp("tiny-models"), {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny_models.build(family, root / family)
        return built[family]

    return get


def shipped_profile(method: str, percent: int) -> Path:
    return PROFILES / f"smollm2-135m-instruct-{method}-{percent}.json"
