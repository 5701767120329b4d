"""Reference forward: a Hugging Face model with the profile's TopK budgets applied by hooks.

The plain-PyTorch twin of what the vLLM plugin serves; tests and ``acttail eval`` compare the two.
``thresholded`` is the same forward with a fixed threshold per projection instead of TopK (TEAL's
rule, Liu et al. 2024), and ``calibrate_thresholds`` picks those thresholds from calibration text;
``tracked`` takes each token's threshold from the token before it, with no calibration.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from acttail_kernels.reference import masked_linear_ref, threshold_mask, topk_mask
from acttail_vllm.profiling.profile import Profile
from acttail_vllm.serving.budgets import MERGED_PROJECTIONS, DecoderProjection, kept_count

#: [tokens, channels] input -> bool mask of the entries a projection keeps.
KeepMask = Callable[[torch.Tensor], torch.Tensor]
#: ``on_mask(layer, projection, mask)``: hears every mask ``thresholded`` or ``tracked`` applies.
MaskObserver = Callable[[int, str, torch.Tensor], None]


def sparse_modules(model: torch.nn.Module) -> Iterator[tuple[DecoderProjection, torch.nn.Linear]]:
    """Every decoder linear ActTail sparsifies, with what it is (its layer, name, and projections
    stacked in its output: one each, or three and two in Phi-3's fused ``qkv_proj`` and
    ``gate_up_proj``). A mixture-of-experts block has none of these modules: its experts stay dense."""
    for index, layer in enumerate(decoder_layers(model)):
        for parent in (layer.self_attn, getattr(layer, "mlp", None)):
            for name, projections in MERGED_PROJECTIONS.items():
                module = getattr(parent, name, None)
                if isinstance(module, torch.nn.Linear):
                    yield DecoderProjection(index, name, projections), module


def kept_counts(proj: DecoderProjection, module: torch.nn.Linear, profile: Profile, shards: int = 1) -> list[int]:
    """Input channels each projection of ``module`` keeps per token (of each of ``shards`` input slices)."""
    return [kept_count(profile.sparsity(proj.layer, name), module.in_features // shards) for name in proj.projections]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers``)."""
    return getattr(model, "model", model).layers


def _topk(keep: int, shards: int) -> KeepMask:
    """The ``keep`` largest entries of each of ``shards`` equal slices of the input."""
    return lambda flat: torch.cat([topk_mask(part, keep) for part in flat.chunk(shards, dim=1)], dim=1)


def _masked_input_hook(mask: KeepMask):
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        return (x * mask(x.reshape(-1, x.shape[-1])).reshape(x.shape), *args[1:])

    return hook


def _segments_hook(seg_bounds: list[int], masks: list[KeepMask]):
    """A fused module's output recomputed with one mask per output segment on the same input, as
    vLLM's merged modules compute it (a pre-hook could sparsify the input only once). With TopK
    masks this is ``sparse_linear_ref``: float32 accumulation, the result in the input's dtype."""

    def hook(module: torch.nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        flat = args[0].reshape(-1, args[0].shape[-1])
        kept = [mask(flat) for mask in masks]
        return masked_linear_ref(flat, module.weight, module.bias, seg_bounds, kept).reshape(output.shape)

    return hook


@contextmanager
def _masked(
    model: torch.nn.Module, profile: Profile, masks_of: Callable[[DecoderProjection, torch.nn.Linear], list[KeepMask]]
) -> Iterator[torch.nn.Module]:
    """Within the block, every projection of ``model`` sees its input masked by ``masks_of(proj,
    module)`` (one mask per projection the module carries); ``profile`` gives the output rows of
    merged modules and must hold exactly the model's projections."""
    handles, hooked = [], 0
    try:
        for proj, module in sparse_modules(model):
            masks = masks_of(proj, module)
            hooked += len(proj.projections)
            if len(masks) == 1:
                handles.append(module.register_forward_pre_hook(_masked_input_hook(masks[0])))
                continue
            rows = [profile.layers[proj.layer].projections[name].out_features for name in proj.projections]
            if sum(rows) != module.out_features:
                raise ValueError(
                    f"the profile of {profile.model.name} gives layer {proj.layer} {', '.join(proj.projections)} "
                    f"{sum(rows)} output rows, the model has {module.out_features}: it was made for another model"
                )
            handles.append(module.register_forward_hook(_segments_hook([0, *itertools.accumulate(rows)], masks)))
        profiled = sum(len(layer.projections) for layer in profile.layers)
        if hooked != profiled:
            raise ValueError(
                f"the profile of {profile.model.name} has {profiled} projections, the model {hooked}: "
                "it was made for another model"
            )
        yield model
    finally:
        for handle in handles:
            handle.remove()


def sparsified(model: torch.nn.Module, profile: Profile, tp_size: int = 1) -> AbstractContextManager[torch.nn.Module]:
    """Within the block, every projection of ``model`` sees its inputs
    TopK-sparsified. With ``tp_size``, the row-parallel ones (o_proj, down_proj) keep the TopK of
    each of ``tp_size`` input shards, as vLLM's tensor-parallel ranks do."""

    def masks_of(proj: DecoderProjection, module: torch.nn.Linear) -> list[KeepMask]:
        shards = tp_size if proj.row_parallel else 1
        return [_topk(keep, shards) for keep in kept_counts(proj, module, profile, shards)]

    return _masked(model, profile, masks_of)


# --- threshold mode -------------------------------------------------------------------------


class Thresholds(BaseModel):
    """Per decoder layer, per projection: a token keeps input channel j where |x_j| >= the threshold
    (0 keeps everything, +inf nothing). ``calibration_tokens``: how many tokens they were picked on."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    calibration_tokens: int = Field(ge=0)
    layers: list[dict[str, float]]

    def of(self, layer: int, projection: str) -> float:
        return self.layers[layer][projection]


def thresholded(
    model: torch.nn.Module, profile: Profile, thresholds: Thresholds, on_mask: MaskObserver | None = None
) -> AbstractContextManager[torch.nn.Module]:
    """Within the block, every projection of ``model`` keeps the input entries
    with |x| >= its threshold: a number of channels that varies by token. An elementwise rule, so
    tensor-parallel shards change nothing. ``on_mask`` hears every mask applied."""

    def masks_of(proj: DecoderProjection, _: torch.nn.Linear) -> list[KeepMask]:
        return [
            _observed(_at_or_above(thresholds.of(proj.layer, name)), proj.layer, name, on_mask)
            for name in proj.projections
        ]

    return _masked(model, profile, masks_of)


def tracked(
    model: torch.nn.Module, profile: Profile, on_mask: MaskObserver | None = None
) -> AbstractContextManager[torch.nn.Module]:
    """Within the block, every projection of ``model`` keeps the input entries of token t with |x| at
    or above the threshold exact TopK had at token t-1 (its k-th largest |x| there): causal and with
    no calibration, but a kept count that varies by token. The first token of a forward keeps its own
    TopK. Rows must be the consecutive tokens of one sequence: batch 1, the whole sequence at once."""

    def masks_of(proj: DecoderProjection, module: torch.nn.Linear) -> list[KeepMask]:
        keeps = kept_counts(proj, module, profile)
        return [
            _observed(_previous_topk_threshold(keep), proj.layer, name, on_mask)
            for name, keep in zip(proj.projections, keeps)
        ]

    return _masked(model, profile, masks_of)


def _at_or_above(threshold: float) -> KeepMask:
    return lambda flat: threshold_mask(flat, threshold)  # compared as the kernels compare


def _previous_topk_threshold(keep: int) -> KeepMask:
    def mask(flat: torch.Tensor) -> torch.Tensor:
        magnitude = flat.abs()
        kth = magnitude.masked_fill(~topk_mask(flat, keep), math.inf).amin(dim=1)  # each row's TopK threshold
        return magnitude >= torch.cat([kth[:1], kth[:-1]])[:, None]

    return mask


def _observed(mask: KeepMask, layer: int, projection: str, on_mask: MaskObserver | None) -> KeepMask:
    """``mask``, telling ``on_mask`` (if any) of every mask it makes."""
    if on_mask is None:
        return mask

    def observed(flat: torch.Tensor) -> torch.Tensor:
        kept = mask(flat)
        on_mask(layer, projection, kept)
        return kept

    return observed


#: The calibration histogram's log2 bins: ``BINS_PER_BINADE`` per factor of 2 (a threshold
#: resolves to ~1% before interpolation), from 2^LOW to 2^HIGH; one bin below (zeros too), one above.
HISTOGRAM_LOW, HISTOGRAM_HIGH, BINS_PER_BINADE = -40, 24, 64
_INNER_BINS = (HISTOGRAM_HIGH - HISTOGRAM_LOW) * BINS_PER_BINADE


@dataclass
class InputHistogram:
    """Counts of a module's input |x| in log2 bins over all calibration tokens and channels: the
    memory of one histogram, not of the activations, however long the calibration text."""

    channels: int
    counts: torch.Tensor  # int64 [_INNER_BINS + 2]: below 2^LOW, the inner bins, at or above 2^HIGH

    @classmethod
    def empty(cls, channels: int) -> InputHistogram:
        return cls(channels, torch.zeros(_INNER_BINS + 2, dtype=torch.int64))

    def add(self, x: torch.Tensor) -> None:
        position = (x.detach().abs().float().log2() - HISTOGRAM_LOW) * BINS_PER_BINADE
        bins = position.floor().clamp(-1, _INNER_BINS).long() + 1  # log2(0) = -inf: the bottom bin
        self.counts += torch.bincount(bins.reshape(-1), minlength=_INNER_BINS + 2).cpu()

    @property
    def tokens(self) -> int:
        return int(self.counts.sum()) // self.channels

    def threshold(self, keep_fraction: float) -> float:
        """The t at which ``keep_fraction`` of the counted entries have |x| >= t, interpolated
        log-uniformly within its bin; 0 if it falls below 2^LOW, +inf for a fraction of 0."""
        if keep_fraction <= 0:
            return math.inf
        if keep_fraction >= 1:
            return 0.0
        counts = self.counts.double()
        wanted = keep_fraction * float(counts.sum())
        at_or_above = counts.flip(0).cumsum(0).flip(0)  # entries in this bin or higher ones
        index = int((at_or_above >= wanted).sum()) - 1  # the last bin whose entries and those above suffice
        if index == 0:
            return 0.0
        if index == _INNER_BINS + 1:
            return 2.0**HISTOGRAM_HIGH
        above = float(at_or_above[index + 1])
        taken = (wanted - above) / float(counts[index])  # of this bin's entries, from its top
        return 2.0 ** (HISTOGRAM_LOW + (index - taken) / BINS_PER_BINADE)


def input_histograms(
    model: torch.nn.Module, batches: Iterable[torch.Tensor]
) -> dict[DecoderProjection, InputHistogram]:
    """Run ``model`` over ``batches`` of input ids and count every sparsified module's input |x|.
    Inside ``thresholded`` (or ``sparsified``) the counts are of each module's input as the masks of
    the modules before it shape it, before its own mask."""
    histograms: dict[DecoderProjection, InputHistogram] = {}
    with torch.inference_mode(), ExitStack() as hooks:
        for proj, module in sparse_modules(model):
            histogram = histograms[proj] = InputHistogram.empty(module.in_features)
            count = module.register_forward_pre_hook(lambda _m, args, h=histogram: h.add(args[0]), prepend=True)
            hooks.callback(count.remove)
        decoder = getattr(model, "model", model)  # no logits needed: a large vocabulary costs more than a layer
        for ids in batches:
            decoder(input_ids=ids, use_cache=False)
    return histograms


def calibrated_thresholds(histograms: dict[DecoderProjection, InputHistogram], profile: Profile) -> Thresholds:
    """Per projection, the threshold that keeps the profile's fraction of its input entries over the
    calibration tokens (TEAL's rule): the mean kept fraction equals the TopK budget there, the count
    per token varies."""
    layers: list[dict[str, float]] = [{} for _ in profile.layers]
    for proj, histogram in histograms.items():
        for name in proj.projections:
            keep = kept_count(profile.sparsity(proj.layer, name), histogram.channels) / histogram.channels
            layers[proj.layer][name] = histogram.threshold(keep)
    return Thresholds(calibration_tokens=next(iter(histograms.values())).tokens, layers=layers)


def calibrate_thresholds(model: torch.nn.Module, profile: Profile, batches: Iterable[torch.Tensor]) -> Thresholds:
    """Thresholds for ``profile``'s budgets from the dense ``model`` run over ``batches`` of input ids."""
    return calibrated_thresholds(input_histograms(model, batches), profile)
