"""A directory of profiles computed once and reused: the loader hook's ``$ACTTAIL_CACHE/profiles``
and the sweep's ``profiles/``.

Safe under faults:

- entries are written whole (``Profile.save``: a temporary file renamed into place), so a reader
  never sees half a file and a writer killed mid-write leaves no entry (its temporary file is
  removed by the next writer of that entry);
- an entry is built under an exclusive lock on ``<entry>.lock`` beside it (``fcntl.flock``, released
  by the kernel if its holder dies), so processes starting at once compute it once;
- an entry that does not load (truncated, corrupt, another model's) is recomputed and replaced;
- an entry whose budgets are not what ``spec`` allocates today (another method under that name in an
  older profile version, or changed rule constants) is re-allocated from its alphas and replaced;
- a directory that cannot be written (read-only, full) leaves the profile in memory for this run.

What went wrong comes back in ``CachedProfile.problems``, for the caller to warn about.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from acttail_vllm.errors import one_line
from acttail_vllm.profiling.allocation import AllocationSpec
from acttail_vllm.profiling.builder import reallocated
from acttail_vllm.profiling.profile import Profile, ProfileError

#: Budgets this close are the same allocation (a profile's JSON keeps floats exactly; this absorbs
#: last-digit differences of the math library between hosts).
SAME_BUDGET = 1e-12


class CachedProfile(NamedTuple):
    profile: Profile
    path: Path | None  # None: kept in memory, the directory could not be written
    reused: bool  # the entry was already there
    alphas_from: Path | None  # new, re-allocated from this file's alphas (None: computed or reused)
    problems: tuple[str, ...]  # what went wrong with the cache, one sentence each


def holds_allocation(profile: Profile, spec: AllocationSpec) -> bool:
    """Whether ``profile``'s budgets are those ``spec`` allocates from its alphas with this version's rule."""
    if profile.allocation != spec:
        return False
    fresh = reallocated(profile, spec)
    return all(
        abs(mine.sparsity - now.sparsity) <= SAME_BUDGET
        for layer, fresh_layer in zip(profile.layers, fresh.layers)
        for mine, now in zip(layer.projections.values(), fresh_layer.projections.values())
    )


@contextlib.contextmanager
def _locked(entry: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``entry``; OSError if its directory cannot be written."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(entry.with_name(f"{entry.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def cached_profile(
    directory: Path,
    prefix: str,
    load: Callable[[Path], Profile],
    compute: Callable[[], Profile],
    spec: AllocationSpec,
) -> CachedProfile:
    """The profile for ``spec`` in ``directory``, file ``{prefix}{spec.file_stem}.json``: read with
    ``load`` if it is there; else re-allocated from the alphas of a profile there with the same
    prefix and estimator (alpha depends only on the weights and the estimator); else
    ``compute()``d. New profiles are saved."""
    path = directory / f"{prefix}{spec.file_stem}.json"
    problems: list[str] = []

    def loaded(candidate: Path) -> Profile | None:
        try:
            return load(candidate)
        except ProfileError as exc:
            problems.append(f"cache entry {candidate} is unusable ({one_line(exc)}): it is rebuilt")
            return None

    def current(profile: Profile | None) -> Profile | None:
        if profile is None or holds_allocation(profile, spec):
            return profile
        problems.append(
            f"cache entry {path} holds {profile.allocation.describe()} budgets, not today's {spec.describe()}: "
            "they are re-allocated from its alphas"
        )
        return None

    def built() -> tuple[Profile, Path | None]:
        for candidate in sorted(directory.glob(f"{prefix}*-{spec.estimator}-eps*.json")):
            if (source := loaded(candidate)) is not None:
                return reallocated(source, spec), candidate
        return compute(), None

    def result(profile: Profile, alphas_from: Path | None, *, saved: bool, reused: bool = False) -> CachedProfile:
        return CachedProfile(profile, path if saved else None, reused, alphas_from, tuple(dict.fromkeys(problems)))

    def in_memory(exc: OSError, profile: Profile, alphas_from: Path | None) -> CachedProfile:
        problems.append(
            f"cannot write the profile cache {directory} ({exc.strerror or exc}): the budgets are kept in "
            "memory for this run only; point ACTTAIL_CACHE at a writable directory with free space to reuse them"
        )
        return result(profile, alphas_from, saved=False)

    # Entries are replaced whole, so reading needs no lock.
    if path.is_file() and (profile := current(loaded(path))) is not None:
        return result(profile, None, saved=True, reused=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_locked(path))
        except OSError as exc:
            return in_memory(exc, *built())
        if path.is_file() and (profile := current(loaded(path))) is not None:
            return result(profile, None, saved=True, reused=True)  # written while this process waited
        for leftover in directory.glob(f".{path.name}.*.tmp"):  # of writers killed mid-write
            leftover.unlink(missing_ok=True)
        profile, alphas_from = built()
        try:
            profile.save(path)
        except OSError as exc:
            return in_memory(exc, profile, alphas_from)
        return result(profile, alphas_from, saved=True)
