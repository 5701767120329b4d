"""How far a projection's TopK threshold moves from one token to the next, on a real model.

The selection kernel (kernels/topk_select.py) starts each call's search from the threshold its call
site left the call before, and is fastest when the new threshold lies in a window of
``SelectOptions.threshold_window`` binades around it; outside, it searches the whole range (slower, never wrong). This
runs SmolLM2-135M-Instruct (real weights) over consecutive tokens of the corpus's tuning slice, takes
every projection input in bf16, and prints per projection and sparsity how many tokens' thresholds
fall in the window centred on the previous token's (one sequence decoding), and the typical move in
bit patterns; then the same against a random other token of the text (a batch, whose rows all
start from the guess token 0 of the call before left).

    python3 -m benchmarks.experiments.threshold_drift [--tokens 1024] [--sparsities 0.5 0.8] [--window 2]
    # CPU, ~2 min
"""

from __future__ import annotations

import argparse
import collections

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from acttail_kernels.reference import topk_mask
from acttail_kernels.topk_select import SHIPPED_OPTIONS, mantissa_bits
from acttail_vllm.dev.models import ensure_smollm2
from acttail_vllm.eval.data import text_slice

INPUTS = {"q_proj": "qkv", "gate_proj": "gate_up", "o_proj": "o", "down_proj": "down"}  # one per input


def threshold_bits(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Per row, the bf16 bit pattern of the keep-th largest |x| (what the kernel's search finds)."""
    kth = x.abs().masked_fill(~topk_mask(x, keep), float("inf")).amin(dim=1)
    return kth.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0x7FFF


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.5, 0.8])
    parser.add_argument(
        "--window", type=int, default=SHIPPED_OPTIONS.threshold_window, help="binades (default: the kernels')"
    )
    args = parser.parse_args()
    model_dir = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).eval()
    ids = tokenizer(text_slice("tuning").text, return_tensors="pt").input_ids[:, : args.tokens]

    inputs: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    # the default argument binds each module's input kind when its hook is made
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, a, kind=INPUTS[name.rsplit(".", 1)[-1]]: inputs[kind].append(  # noqa: B008
                a[0].reshape(-1, a[0].shape[-1]).float()
            )
        )
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in INPUTS
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()

    half = (args.window << mantissa_bits(torch.bfloat16)) // 2
    print(
        f"SmolLM2-135M-Instruct, bf16, {ids.shape[1]} consecutive tokens of the tuning slice, "
        f"{len(inputs['qkv'])} layers: threshold of token t against token t-1 at the same layer "
        f"(bit patterns; the window holds +-{half}, {args.window} binades)"
    )
    print(
        f"{'input':8s} {'s':>4s} {'in window':>10s} {'median |move|':>14s} {'p99 |move|':>11s} {'max':>6s}"
        f" {'random other token: in window':>30s}"
    )
    other = torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))
    total = hits = other_hits = 0
    for kind, per_layer in inputs.items():
        for sparsity in args.sparsities:
            moves, jumps = [], []
            for x in per_layer:
                bits = threshold_bits(x, round((1 - sparsity) * x.shape[1]))
                moves.append(bits[1:] - bits[:-1])
                jumps.append(bits[1:] - bits[other][1:])
            move = torch.cat(moves).abs().float()
            inside, inside_other = int((move < half).sum()), int((torch.cat(jumps).abs() < half).sum())
            total, hits, other_hits = total + move.numel(), hits + inside, other_hits + inside_other
            print(
                f"{kind:8s} {sparsity:4.2f} {inside / move.numel():10.4f} {move.median():14.0f} "
                f"{move.quantile(0.99):11.0f} {move.max():6.0f} {inside_other / move.numel():30.4f}"
            )
    print(
        f"all: {hits / total:.4f} of {total} token steps in the window; {other_hits / total:.4f} against a random "
        "other token"
    )


if __name__ == "__main__":
    main()
