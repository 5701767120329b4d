"""The model fingerprint that ties a profile to the weights it was computed from.

A fingerprint is a sha256 over the architecture and, per (layer, projection), the weight's shape
and its first ``FINGERPRINT_ROW_VALUES`` values. The profiler, the loader hook and ``acttail eval``
all sample weights through ``weight_sample``, so the three always agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

#: Values of W[0, :FINGERPRINT_ROW_VALUES] of each projection enter the fingerprint.
FINGERPRINT_ROW_VALUES = 16


class WeightSample(NamedTuple):
    """What of one projection's (out, in) weight enters the fingerprint."""

    out_features: int
    in_features: int
    first_row: torch.Tensor  # W[0, :FINGERPRINT_ROW_VALUES], on the CPU


def weight_sample(weight: torch.Tensor) -> WeightSample:
    """The sample of a weight in Hugging Face (out_features, in_features) layout, on any device."""
    return WeightSample(weight.shape[0], weight.shape[1], weight[0, :FINGERPRINT_ROW_VALUES].to("cpu"))


def model_fingerprint(architecture: str, samples: Mapping[tuple[int, str], WeightSample]) -> str:
    """sha256 over the architecture and every (layer, projection)'s sample, in sorted order.

    Values are rounded through bfloat16 first, so one checkpoint served as bf16, fp16 or fp32 gives
    one fingerprint.
    """
    digest = hashlib.sha256(architecture.encode())
    for layer, proj in sorted(samples):
        out_features, in_features, first_row = samples[(layer, proj)]
        row = torch.as_tensor(first_row).detach().reshape(-1)[:FINGERPRINT_ROW_VALUES]
        bits = row.to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
        digest.update(f"|{layer}.{proj}:{out_features}x{in_features}:".encode())
        digest.update(bits.numpy().tobytes())
    return digest.hexdigest()


def fingerprint_of(architecture: str, weights: Iterable[tuple[int, str, torch.Tensor]]) -> str:
    """The fingerprint of a stream of (layer, projection, (out, in) weight)."""
    return model_fingerprint(architecture, {(layer, proj): weight_sample(w) for layer, proj, w in weights})
