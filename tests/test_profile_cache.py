"""The profile cache: computed once, re-allocated, reused; and its faults: processes building one
entry at once, a writer killed mid-write, a corrupt entry, a directory that cannot be written."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acttail_vllm.profiling.allocation import TYPE_COSTS, AllocationSpec
from acttail_vllm.profiling.builder import reallocated
from acttail_vllm.profiling.profile import Profile
from acttail_vllm.profiling.profile_cache import cached_profile
from tests.conftest import REPO
from tests.test_profiler_cli import profile_tiny, tiny_stream, tiny_weights

SPEC = AllocationSpec(0.6, "acttail", "hill", 0.1, 0.9)
ENTRY = "fp-acttail-hill-eps0.1-smax0.9-s0.6.json"

#: A child process that takes the cache entry of SPEC in argv[1]; its compute() appends a line to
#: argv[2] and sleeps argv[3] seconds. Before calling the cache it waits for argv[4] to exist (so
#: that two children ask at the same moment); argv[5] == "hang" makes it hang between writing the
#: entry's temporary file and renaming it into place.
CHILD = """
import os, sys, time
from pathlib import Path
from acttail_vllm.profiling.allocation import TYPE_COSTS, AllocationSpec
from acttail_vllm.profiling.profile import Profile
from acttail_vllm.profiling.profile_cache import cached_profile
from tests.test_profiler_cli import profile_tiny, tiny_stream, tiny_weights

directory, computed, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[4])
sleep_s, mode = float(sys.argv[3]), sys.argv[5]

def compute():
    with computed.open("a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(sleep_s)
    return profile_tiny(tiny_stream(tiny_weights()))

if mode == "hang":
    def replace_after_a_hang(src, dst):
        Path(str(dst) + ".hanging").touch()
        time.sleep(600)
    os.replace = replace_after_a_hang
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
result = cached_profile(directory, "fp-", Profile.load, compute, AllocationSpec(0.6, "acttail", "hill", 0.1, 0.9))
print("reused" if result.reused else "built", flush=True)
"""


def child(tmp_path: Path, sleep_s: float, mode: str = "normal") -> subprocess.Popen:
    args = [str(tmp_path / "cache"), str(tmp_path / "computed"), str(sleep_s), str(tmp_path / "go"), mode]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def get(directory: Path, compute, spec: AllocationSpec = SPEC):
    return cached_profile(directory, "fp-", Profile.load, compute, spec)


def tiny_compute(computed: list):
    def compute() -> Profile:
        computed.append(1)
        return profile_tiny(tiny_stream(tiny_weights()))

    return compute


def test_cached_profile_computes_once_then_reallocates_then_reuses(tmp_path):
    computed = []
    compute = tiny_compute(computed)

    def spec(target, estimator="hill"):
        return AllocationSpec(target, "acttail", estimator, 0.1, 0.9)

    first = get(tmp_path, compute, spec(0.6))
    assert (first.reused, first.alphas_from, len(computed), first.problems) == (False, None, 1, ())
    assert first.path.name == ENTRY and first.path.is_file()
    second = get(tmp_path, compute, spec(0.8))
    assert (second.reused, second.alphas_from, len(computed)) == (False, first.path, 1)
    assert second.profile == reallocated(first.profile, spec(0.8))
    again = get(tmp_path, compute, spec(0.8))
    assert (again.reused, again.profile, len(computed)) == (True, second.profile, 1)
    get(tmp_path, compute, spec(0.6, estimator="ww"))  # other alphas: computed, not re-allocated
    assert len(computed) == 2


def test_two_processes_building_one_entry_compute_it_once(tmp_path):
    """Both find no entry at the same moment; the lock makes the second wait and read the first's."""
    children = [child(tmp_path, sleep_s=1.5) for _ in range(2)]
    assert [c.stdout.readline().strip() for c in children] == ["ready", "ready"]
    (tmp_path / "go").touch()
    outcomes = sorted(c.communicate(timeout=120)[0].strip() for c in children)
    assert [c.returncode for c in children] == [0, 0]
    assert outcomes == ["built", "reused"]
    assert len((tmp_path / "computed").read_text().split()) == 1
    entry = tmp_path / "cache" / ENTRY
    assert Profile.load(entry) == profile_tiny(tiny_stream(tiny_weights()))
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")] == []


def test_a_writer_killed_mid_write_leaves_no_entry(tmp_path):
    writer = child(tmp_path, sleep_s=0.0, mode="hang")
    assert writer.stdout.readline().strip() == "ready"
    (tmp_path / "go").touch()
    entry = tmp_path / "cache" / ENTRY
    hanging = Path(f"{entry}.hanging")
    deadline = time.monotonic() + 120
    while not hanging.exists():
        assert writer.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)  # between writing the temporary file and renaming it
    writer.wait()
    leftovers = list(entry.parent.glob(f".{entry.name}.*.tmp"))
    assert not entry.exists() and len(leftovers) == 1 and json.loads(leftovers[0].read_text())

    computed = []
    again = get(entry.parent, tiny_compute(computed))  # the dead writer's lock is gone with it
    assert (again.reused, len(computed), again.problems) == (False, 1, ())
    assert Profile.load(entry) == again.profile
    assert list(entry.parent.glob(f".{entry.name}.*.tmp")) == []


@pytest.mark.parametrize("damage", ["truncated", "not a profile", "another model"])
def test_a_corrupt_entry_is_detected_rebuilt_and_replaced(tmp_path, damage):
    computed = []
    good = get(tmp_path, tiny_compute(computed))
    text = good.path.read_text()
    if damage == "truncated":
        good.path.write_text(text[: len(text) // 2])
    elif damage == "not a profile":
        good.path.write_text("[]")
    else:
        good.path.write_text(text.replace(good.profile.model.fingerprint, "0" * 64))

    def load(path: Path) -> Profile:
        return Profile.load(path, expected_fingerprint=good.profile.model.fingerprint)

    again = cached_profile(tmp_path, "fp-", load, tiny_compute(computed), SPEC)
    assert (again.reused, len(computed), again.path) == (False, 2, good.path)
    (problem,) = again.problems
    assert problem.startswith(f"cache entry {good.path} is unusable (profile {good.path} ") and problem.endswith(
        "): it is rebuilt"
    )
    assert load(good.path) == good.profile


def test_a_directory_that_cannot_be_written_keeps_the_profile_in_memory(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    computed = []
    result = get(blocker / "profiles", tiny_compute(computed))
    assert (result.path, result.reused, len(computed)) == (None, False, 1)
    assert result.profile == profile_tiny(tiny_stream(tiny_weights()))
    (problem,) = result.problems
    assert problem.startswith(f"cannot write the profile cache {blocker / 'profiles'} (")
    assert "kept in memory for this run only; point ACTTAIL_CACHE at a writable directory" in problem


def test_a_full_disk_keeps_the_profile_in_memory(tmp_path, monkeypatch):
    def full(self, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Profile, "save", full)
    computed = []
    result = get(tmp_path, tiny_compute(computed))
    assert (result.path, len(computed)) == (None, 1)
    (problem,) = result.problems
    assert f"cannot write the profile cache {tmp_path} (No space left on device)" in problem
    assert not (tmp_path / ENTRY).exists()


def test_an_entry_of_the_old_rule_is_never_served_as_acttail(tmp_path):
    """A version-1 file named for ``acttail`` holds AlphaPruning budgets: it reads as alphapruning,
    so the cache re-allocates acttail from its alphas and replaces it."""
    computed = []
    entry = get(tmp_path, tiny_compute(computed)).path
    old_rule = reallocated(Profile.load(entry), AllocationSpec(0.6, "alphapruning", "hill", 0.1, 0.9))
    entry.write_text(json.dumps({**old_rule.model_dump(mode="json"), "schema_version": 1, "method": "acttail"}))
    assert Profile.load(entry) == old_rule

    again = get(tmp_path, tiny_compute(computed))
    assert (again.reused, again.alphas_from, len(computed)) == (False, entry, 1)
    assert again.profile == reallocated(old_rule, SPEC) != old_rule
    (problem,) = again.problems
    assert problem.startswith(f"cache entry {entry} holds alphapruning at target 0.6 ")
    assert Profile.load(entry) == again.profile and Profile.load(entry).method == "acttail"
    assert get(tmp_path, tiny_compute(computed)).reused


def test_an_entry_of_other_rule_constants_is_reallocated(tmp_path, monkeypatch):
    computed = []
    first = get(tmp_path, tiny_compute(computed))
    monkeypatch.setitem(TYPE_COSTS, "v_proj", 10 * TYPE_COSTS["v_proj"])
    again = get(tmp_path, tiny_compute(computed))
    assert (again.reused, again.alphas_from, len(computed)) == (False, first.path, 1)
    assert again.profile == reallocated(first.profile, SPEC) != first.profile
    assert get(tmp_path, tiny_compute(computed)).reused
