"""The model-loader hook: every sparse module's budget, once all weights are loaded.

``BudgetResolver.resolve`` takes the loaded projections of every ActTail module and returns their
budgets. A profile source (already read and validated when the settings were resolved) is checked
against the loaded weights (fingerprint, shapes); otherwise a profile is built from those weights
with the profiler's math on their device, cached by model fingerprint and reused on the next start.
vLLM-free: the linear method hands it the weights and applies what it returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from acttail_vllm.profiling.builder import profile_from_weights
from acttail_vllm.profiling.fingerprint import fingerprint_of
from acttail_vllm.profiling.profile import ATTENTION_PROJECTIONS, Profile, ProfileError, named
from acttail_vllm.profiling.profile_cache import cached_profile
from acttail_vllm.serving.budgets import DecoderProjection, ModuleBudget
from acttail_vllm.serving.settings import BudgetSource, profile_cache_dir

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM prints it
#: Progress lines while the loader hook computes alphas (a 13B model takes a minute on a GPU).
PROGRESS_LINES = 10


@dataclass(frozen=True)
class LoadedModule:
    """One ActTail module as loaded on this rank: its projections' [out, in] weights, in order."""

    proj: DecoderProjection
    weights: tuple[torch.Tensor, ...]
    rank_shards: tuple[int, ...]  # DecoderProjection.rank_shards: ranks each projection is split over

    @property
    def in_features(self) -> int:
        return self.weights[0].shape[1]


class BudgetResolver:
    """Where this worker's budgets come from (``source``), and the profile they were read from."""

    def __init__(self, source: BudgetSource, model_name: str, architecture: str, tp_size: int):
        self.source = source
        self.model_name = model_name
        self.architecture = architecture
        self.tp_size = tp_size
        self.profile: Profile | None = None
        self.profile_path: Path | None = None
        self.build_seconds = 0.0

    def resolve(self, modules: Sequence[LoadedModule]) -> list[ModuleBudget]:
        """The budget of each module (in order), from the source's profile or one built from the
        weights; logs what it did."""
        start = time.perf_counter()
        weights = list(_projection_weights(modules))
        # A row-parallel shard is not the matrix the profile was made from, so with TP > 1 only the
        # shapes are checked, not the sampled values.
        fingerprint = fingerprint_of(self.architecture, weights) if self.tp_size == 1 else None
        if self.source.kind == "profile":
            self.profile, self.profile_path = self.source.profile, self.source.settings.profile
            if fingerprint is not None:
                self.profile.check_model(fingerprint, self.profile_path, self.model_name, self.source.origin.name)
        else:
            self.profile = self._cached_or_built(fingerprint, modules, weights)
        budgets = [self._budget(module) for module in modules]
        self.build_seconds = time.perf_counter() - start
        logger.info(
            "ActTail: %d modules sparse, weighted sparsity %.4f, budgets ready in %.1f s (%s)",
            len(modules),
            self.profile.achieved_sparsity,
            self.build_seconds,
            self.source.describe(),
        )
        if (experts := experts_note(modules)) is not None:
            logger.info("ActTail: %s", experts)
        return budgets

    def _cached_or_built(
        self, fingerprint: str, modules: Sequence[LoadedModule], weights: list[tuple[int, str, torch.Tensor]]
    ) -> Profile:
        """The cached profile for these settings; else one re-allocated from the alphas of a cached
        profile of this model (same estimator: no eigenvalues); else one computed from the weights."""
        spec = self.source.settings.allocation

        def from_weights() -> Profile:
            logger.info(
                "ActTail: computing budgets from the loaded weights: alpha of %d projections "
                "(first start of this model with estimator %s; the result is cached)",
                len(weights),
                spec.estimator,
            )
            num_layers = 1 + max(m.proj.layer for m in modules)
            return profile_from_weights(
                self.model_name, self.architecture, num_layers, weights, spec, on_projection=_progress_logger()
            )

        def load(path: Path) -> Profile:
            return Profile.load(path, expected_fingerprint=fingerprint)

        cached = cached_profile(profile_cache_dir(), f"{fingerprint[:16]}-", load, from_weights, spec)
        for problem in cached.problems:
            logger.warning("ActTail: %s", problem)
        self.profile_path = cached.path
        if cached.reused:
            logger.info("ActTail: reusing cached profile %s", cached.path)
        else:
            if cached.alphas_from is not None:
                logger.info("ActTail: budgets re-allocated from the alphas in %s", cached.alphas_from)
            if cached.path is not None:
                logger.info("ActTail: wrote profile %s", cached.path)
        return cached.profile

    @property
    def _profile_name(self) -> str:
        if self.source.kind == "profile":
            return named(self.profile_path, self.source.origin.name)
        return named(self.profile_path or "kept in memory", "the loader hook")

    def _budget(self, module: LoadedModule) -> ModuleBudget:
        proj = module.proj
        sparsities = []
        for name, weight, shards in zip(proj.projections, module.weights, module.rank_shards):
            try:
                entry = self.profile.layers[proj.layer].projections[name]
            except (IndexError, KeyError):
                raise ProfileError(
                    f"{self._profile_name} has no entry for layer {proj.layer} {name}: it was made for "
                    f"another model; build one for {self.model_name} with `acttail profile`"
                ) from None
            # row-parallel modules shard the input dimension, the others the output dimension
            out_full, in_full = weight.shape
            if proj.row_parallel:
                in_full *= shards
            else:
                out_full *= shards
            if (entry.out_features, entry.in_features) != (out_full, in_full):
                raise ProfileError(
                    f"{self._profile_name} gives layer {proj.layer} {name} the shape "
                    f"{entry.out_features}x{entry.in_features}, the loaded model has "
                    f"{tuple(weight.shape)} per rank (tensor parallel {self.tp_size}): it was made "
                    f"for another model; build one for {self.model_name} with `acttail profile`"
                )
            sparsities.append(entry.sparsity)
        return ModuleBudget.from_sparsities(tuple(sparsities), module.in_features)


def _progress_logger(lines: int = PROGRESS_LINES) -> Callable[[int, int], None]:
    """``on_projection`` for ``profile_from_weights``: about ``lines`` log lines over the whole run."""
    start = time.perf_counter()

    def log(done: int, total: int) -> None:
        if done == total or done % max(1, total // lines) == 0:
            logger.info("ActTail: alpha of %d/%d projections in %.1f s", done, total, time.perf_counter() - start)

    return log


def _projection_weights(modules: Sequence[LoadedModule]) -> Iterator[tuple[int, str, torch.Tensor]]:
    for module in modules:
        for name, weight in zip(module.proj.projections, module.weights):
            yield module.proj.layer, name, weight


def experts_note(modules: Sequence[LoadedModule]) -> str | None:
    """For a mixture-of-experts model (a layer without MLP modules), one line saying what is sparse
    and that experts stay dense; None for a dense model."""
    num_layers = 1 + max(m.proj.layer for m in modules)
    mlp_layers = sorted({m.proj.layer for m in modules if set(m.proj.projections) - set(ATTENTION_PROJECTIONS)})
    if len(mlp_layers) == num_layers:
        return None
    dense_mlps = f"and the dense MLP of layer(s) {', '.join(map(str, mlp_layers))}" if mlp_layers else "alone"
    return (
        f"mixture of experts: the attention of all {num_layers} layers {dense_mlps} is sparse; "
        "routers and experts (routed and shared) stay dense"
    )
