"""Threshold mode of the reference forward (``reference.thresholded``, ``calibrate_thresholds``) on
tiny random-weight models: calibration meets the budgets, and the extreme thresholds mean what they say."""

from __future__ import annotations

import math

import pytest
import torch

from acttail_kernels.reference import topk_mask
from acttail_vllm.eval.reference import Thresholds, calibrate_thresholds, sparse_modules, thresholded, tracked
from acttail_vllm.profiling.allocation import AllocationSpec
from acttail_vllm.profiling.builder import profile_model
from acttail_vllm.serving.budgets import kept_count
from tests.tiny_models import VOCAB


def _model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _batches(count: int = 3, length: int = 64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (1, length), generator=generator) for _ in range(count)]


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_calibrated_thresholds_keep_the_budget_on_the_calibration_tokens(tiny_model, family, sparsity):
    directory = tiny_model(family)
    model, profile = _model(directory), profile_model(str(directory), AllocationSpec(sparsity))
    batches = _batches()
    thresholds = calibrate_thresholds(model, profile, batches)
    assert thresholds.calibration_tokens == sum(ids.numel() for ids in batches)

    inputs: dict = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, proj=proj: inputs.setdefault(proj, []).append(args[0]))
        for proj, module in sparse_modules(model)
    ]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    for proj, seen in inputs.items():
        x = torch.cat(seen).reshape(-1, seen[0].shape[-1]).abs()
        for name in proj.projections:
            kept = float((x >= thresholds.of(proj.layer, name)).double().mean())
            budget = kept_count(profile.sparsity(proj.layer, name), x.shape[1]) / x.shape[1]
            assert kept == pytest.approx(budget, abs=2e-3), (proj, name)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_threshold_zero_is_dense_and_infinity_zeroes_every_input(tiny_model, family):
    directory = tiny_model(family)
    model, profile = _model(directory), profile_model(str(directory), AllocationSpec(0.5))
    ids = _batches(1)[0]

    def everywhere(value: float) -> Thresholds:
        return Thresholds(
            calibration_tokens=0, layers=[dict.fromkeys(layer.projections, value) for layer in profile.layers]
        )

    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with thresholded(model, profile, everywhere(0.0)):
            assert torch.equal(model(input_ids=ids).logits, dense)

        outputs, kept = [], []
        with thresholded(model, profile, everywhere(math.inf), lambda *args: kept.append(int(args[2].sum()))):
            # registered after the masks: a fused module's forward hook must see the recomputed output
            hooks = [
                module.register_forward_hook(lambda _m, _a, out: outputs.append(out))
                for _, module in sparse_modules(model)
            ]
            model(input_ids=ids)
            for hook in hooks:
                hook.remove()
    assert outputs and all(not out.any() for out in outputs)  # no bias in these families: zero input, zero output
    assert len(kept) == sum(len(layer.projections) for layer in profile.layers) and not any(kept)
    assert Thresholds.model_validate_json(everywhere(math.inf).model_dump_json()) == everywhere(math.inf)


def test_tracked_keeps_what_reaches_the_previous_tokens_topk_threshold(tiny_model):
    """Layer 0's q_proj sees the same input whatever the masks: check the rule there."""
    directory = tiny_model("llama")
    model, profile = _model(directory), profile_model(str(directory), AllocationSpec(0.7))
    ids = _batches(1)[0]
    q_proj = model.model.layers[0].self_attn.q_proj
    keep = kept_count(profile.sparsity(0, "q_proj"), q_proj.in_features)
    inputs, masks = [], {}
    with torch.no_grad():
        hook = q_proj.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]), prepend=True)
        with tracked(model, profile, lambda layer, name, kept: masks.setdefault((layer, name), kept)):
            model(input_ids=ids)
        hook.remove()
    x = inputs[0].reshape(-1, q_proj.in_features)
    kth = x.abs().masked_fill(~topk_mask(x, keep), math.inf).amin(dim=1)
    mask = masks[(0, "q_proj")]
    assert torch.equal(mask[0], topk_mask(x, keep)[0])  # the first token: its own TopK
    assert torch.equal(mask[1:], x[1:].abs() >= kth[:-1, None])
    assert mask.sum(dim=1).float().std() > 0  # a count that varies by token
