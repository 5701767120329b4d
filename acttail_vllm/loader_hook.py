"""Resolve every sparse module's budget once all weights are loaded (the model-loader hook).

Each ActTail module registers itself when vLLM creates its weights and reports in when vLLM has
processed them. When the last one reports, the resolver either checks the chosen profile against
the loaded weights (fingerprint, shapes) or builds a profile from those weights with the profiler's
math on their device, caches it by model fingerprint, and reuses it on the next start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from acttail_vllm.budgets import DecoderProjection, ModuleBudget
from acttail_vllm.profile import FINGERPRINT_ROW_VALUES, Profile, ProfileError, model_fingerprint
from acttail_vllm.profiler import cached_profile, profile_from_weights
from acttail_vllm.settings import BudgetSource, profile_cache_dir

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM prints it


@dataclass
class _Module:
    layer: torch.nn.Module
    proj: DecoderProjection
    loaded: bool = False


def hf_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The module's weight as [out, in] (a view when the kernels re-laid it out as [in, out])."""
    weight = layer.weight
    return weight.t() if getattr(layer, "acttail_kernel_layout", False) else weight


def projection_weights(module: torch.nn.Module, proj: DecoderProjection) -> Iterator[tuple[str, torch.Tensor]]:
    """(projection name, [out, in] view) for each projection a merged vLLM module carries."""
    weight = hf_weight(module)
    start = 0
    for name, size in zip(proj.projections, module.acttail_out_sizes):
        yield name, weight[start : start + size]
        start += size


class BudgetResolver:
    def __init__(self, source: BudgetSource, model_name: str, architecture: str, tp_size: int):
        self.source = source
        self.model_name = model_name
        self.architecture = architecture
        self.tp_size = tp_size
        self.modules: list[_Module] = []
        self.profile: Profile | None = None
        self.profile_path: Path | None = None
        self.build_seconds = 0.0
        if source.kind == "profile":  # fail before the weights load if the file is unusable
            Profile.load(source.settings.profile)

    def register(self, layer: torch.nn.Module, proj: DecoderProjection) -> None:
        self.modules.append(_Module(layer, proj))

    def loaded(self, layer: torch.nn.Module) -> bool:
        """Mark ``layer`` processed; True when it was the last one and the budgets got resolved."""
        for module in self.modules:
            if module.layer is layer:
                module.loaded = True
        if self.profile is None and all(m.loaded for m in self.modules):
            self._resolve()
            return True
        return False

    def _weights(self) -> Iterator[tuple[int, str, torch.Tensor]]:
        for module in self.modules:
            for name, weight in projection_weights(module.layer, module.proj):
                yield module.proj.layer, name, weight

    def _fingerprint(self) -> str:
        samples = {
            (layer, name): (w.shape[0], w.shape[1], w[0, :FINGERPRINT_ROW_VALUES])
            for layer, name, w in self._weights()
        }
        return model_fingerprint(self.architecture, samples)

    def _resolve(self) -> None:
        start = time.perf_counter()
        settings = self.source.settings
        # A row-parallel shard is not the matrix the profile was made from, so with TP > 1 only the
        # shapes are checked, not the sampled values.
        fingerprint = self._fingerprint() if self.tp_size == 1 else None
        if self.source.kind == "profile":
            self.profile = Profile.load(settings.profile, expected_fingerprint=fingerprint)
            self.profile_path = settings.profile
        else:
            self.profile = self._cached_or_built(fingerprint)
        for module in self.modules:
            budget = self._budget(module)
            module.layer.acttail_budget = budget
            module.layer.acttail_keep.copy_(torch.tensor(budget.seg_keep, dtype=torch.int32))
        self.build_seconds = time.perf_counter() - start
        logger.info(
            "ActTail: %d modules sparse, weighted sparsity %.4f, budgets ready in %.1f s (%s)",
            len(self.modules),
            self.profile.achieved_sparsity,
            self.build_seconds,
            self.source.describe(),
        )

    def _cached_or_built(self, fingerprint: str) -> Profile:
        """The cached profile for these settings; else one re-allocated from the alphas of a cached
        profile of this model (same estimator: no eigenvalues); else one computed from the weights."""
        settings = self.source.settings

        def from_weights() -> Profile:
            logger.info("ActTail: computing budgets from the loaded weights (first start)")
            return profile_from_weights(
                self.model_name,
                self.architecture,
                1 + max(m.proj.layer for m in self.modules),
                self._weights(),
                target=settings.sparsity,
                method=settings.method,
                estimator=settings.estimator,
                eps=settings.eps,
                s_max=settings.s_max,
            )

        cached = cached_profile(
            profile_cache_dir(),
            f"{fingerprint[:16]}-",
            lambda path: Profile.load(path, expected_fingerprint=fingerprint),
            from_weights,
            target=settings.sparsity,
            method=settings.method,
            estimator=settings.estimator,
            eps=settings.eps,
            s_max=settings.s_max,
        )
        self.profile_path = cached.path
        if cached.reused:
            logger.info("ActTail: reusing cached profile %s", cached.path)
        else:
            if cached.alphas_from is not None:
                logger.info("ActTail: budgets re-allocated from the alphas in %s", cached.alphas_from)
            logger.info("ActTail: wrote profile %s", cached.path)
        return cached.profile

    def _budget(self, module: _Module) -> ModuleBudget:
        layer, proj = module.layer, module.proj
        in_features = hf_weight(layer).shape[1]
        sparsities = []
        for name, weight in projection_weights(layer, proj):
            try:
                entry = self.profile.layers[proj.layer].projections[name]
            except (IndexError, KeyError):
                raise ProfileError(
                    f"profile {self.profile_path} has no entry for layer {proj.layer} {name}: it was "
                    "made for another model; build one with `acttail profile`"
                ) from None
            # row-parallel modules shard the input dimension, the others the output dimension
            out_full, in_full = weight.shape
            if proj.row_parallel:
                in_full *= self.tp_size
            else:
                out_full *= self.tp_size
            if (entry.out_features, entry.in_features) != (out_full, in_full):
                raise ProfileError(
                    f"profile {self.profile_path} gives layer {proj.layer} {name} the shape "
                    f"{entry.out_features}x{entry.in_features}, the loaded model has "
                    f"{tuple(weight.shape)} per rank (tensor parallel {self.tp_size}): it was made "
                    "for another model; build one with `acttail profile`"
                )
            sparsities.append(entry.sparsity)
        return ModuleBudget.from_sparsities(tuple(sparsities), in_features)
