"""vLLM quantization method ``acttail``: ``ActTailConfig`` and ``ActTailLinearMethod``.

Shaped like vLLM's own methods (``fp8.py``, ``awq_triton.py``): the config hands every decoder
projection a linear method; the method keeps vLLM's unquantized weights (re-laid out for the
kernels on CUDA) and calls the ``acttail::sparse_linear`` op. No math lives here.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.platforms import current_platform
from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

from acttail_vllm.budgets import DecoderProjection, decoder_projection
from acttail_vllm.loader_hook import BudgetResolver
from acttail_vllm.metrics import start_snapshot_writer
from acttail_vllm.profile import Profile
from acttail_vllm.settings import (
    SettingsError,
    SparsityPolicy,
    resolve_budget_source,
)
from acttail_vllm.stats import new_stats

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM prints it


class ActTailConfig(QuantizationConfig):
    """Config for ActTail activation sparsity; weights stay in the model's own dtype."""

    def __init__(self, explicit: dict[str, Any] | None = None) -> None:
        super().__init__()
        # Validate what the user passed (config, env, profile file) now, in the process that parses
        # the command line: bad input stops `vllm serve` in seconds, before an engine starts. The
        # workers resolve it again with the model directory and check the profile's fingerprint.
        source = resolve_budget_source(explicit, None)
        if source.kind == "profile":
            Profile.load(source.settings.profile)
        self.explicit = explicit
        self._resolver: BudgetResolver | None = None

    def __repr__(self) -> str:
        return f"ActTailConfig(explicit={self.explicit})"

    def __getstate__(self) -> dict[str, Any]:
        # The resolver holds modules of one worker's model: never ship it to another process.
        return {**self.__dict__, "_resolver": None}

    @classmethod
    def get_name(cls) -> str:
        return "acttail"

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton kernels need Ampere or newer

    @staticmethod
    def get_config_filenames() -> list[str]:
        # A profile inside the model directory is found by settings.resolve_budget_source.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ActTailConfig":
        return cls(config)

    @classmethod
    def from_config_file(cls, path: str) -> "ActTailConfig":
        """``--hf-overrides '{"quantization_config_file": "profile.json"}'``."""
        return cls({"profile": path})

    @property
    def resolver(self) -> BudgetResolver:
        if self._resolver is None:
            self._resolver = self._make_resolver()
        return self._resolver

    def _make_resolver(self) -> BudgetResolver:
        vllm_config = get_current_vllm_config()
        model_config = vllm_config.model_config
        source = resolve_budget_source(self.explicit, model_config.model)
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        if source.kind == "loader_hook" and tp_size > 1:
            raise SettingsError(
                "ActTail's loader hook computes budgets from whole weight matrices, but tensor "
                f"parallel size is {tp_size}: build a profile first (`acttail profile MODEL "
                "--sparsity S -o P.json`) and pass it (ACTTAIL_PROFILE=P.json)"
            )
        if source.settings.policy is SparsityPolicy.DECODE:
            _check_decode_policy_graph_mode(vllm_config)
        logger.info("ActTail budgets: %s", source.describe())
        architectures = getattr(model_config.hf_config, "architectures", None) or ["unknown"]
        return BudgetResolver(source, model_config.model, architectures[0], tp_size)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        proj = decoder_projection(prefix)
        if proj is None:
            return UnquantizedLinearMethod()
        return ActTailLinearMethod(self, proj)


def _check_decode_policy_graph_mode(vllm_config: Any) -> None:
    """policy=decode reads each step's batch layout in Python: CUDA graphs may only cover
    decode-only batches, where every token is a decode token."""
    if vllm_config.model_config.enforce_eager or not current_platform.is_cuda_alike():
        return
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode.has_piecewise_cudagraphs():
        raise SettingsError(
            f"ActTail policy=decode cannot run under cudagraph mode {mode.name}: mixed prefill/decode "
            "batches would replay one captured mask. Pass --compilation-config "
            "'{\"cudagraph_mode\": \"FULL_DECODE_ONLY\"}' or --enforce-eager, or use policy=all"
        )


class ActTailLinearMethod(LinearMethodBase):
    """TopK-sparse inputs for one decoder module (merged qkv / gate_up keep one budget each)."""

    def __init__(self, quant_config: ActTailConfig, proj: DecoderProjection) -> None:
        self.quant_config = quant_config
        self.proj = proj
        self.dense = UnquantizedLinearMethod()
        self.decode_only = False
        self.max_sparse_tokens: int | None = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        self.dense.create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            params_dtype,
            **extra_weight_attrs,
        )
        if len(output_partition_sizes) != len(self.proj.projections):
            raise SettingsError(
                f"ActTail: {self.proj.module} of layer {self.proj.layer} has "
                f"{len(output_partition_sizes)} output segments, expected {self.proj.projections}"
            )
        layer.acttail_out_sizes = tuple(output_partition_sizes)
        layer.acttail_seg_bounds = [0, *itertools.accumulate(output_partition_sizes)]
        # Budgets are filled in once all weights are loaded (loader_hook.BudgetResolver).
        n_seg = len(output_partition_sizes)
        layer.register_buffer("acttail_keep", torch.zeros(n_seg, dtype=torch.int32), persistent=False)
        layer.register_buffer("acttail_thr_guess", torch.zeros(n_seg, dtype=torch.int32), persistent=False)
        resolver = self.quant_config.resolver
        on_gpu = current_platform.is_cuda_alike()
        # On CPU every module counts its kept channels from the masks it applies. On a GPU every
        # counter update is one more tiny kernel per step, so only the first module counts
        # (tokens per path); the kernels keep exactly seg_keep channels per row by construction.
        self.count_stats = not on_gpu or not resolver.modules
        layer.acttail_stats_host = new_stats(n_seg, pin_memory=on_gpu)
        stats = layer.acttail_stats_host
        if on_gpu:
            stats = get_accelerator_view_from_cpu_tensor(stats)
        layer.register_buffer("acttail_stats", stats, persistent=False)
        layer.acttail_counts_stats = self.count_stats
        self.decode_only = resolver.source.settings.policy is SparsityPolicy.DECODE
        self.max_sparse_tokens = resolver.source.settings.max_sparse_tokens
        resolver.register(layer, self.proj)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.weight.is_cuda:
            import acttail_kernels

            available, reason = acttail_kernels.kernels_available(layer.weight.device)
            if not available:
                raise RuntimeError(
                    f"ActTail needs its Triton kernels on {layer.weight.device}: {reason}. "
                    "Install triton>=3.4 for this CUDA device, or serve on CPU"
                )
            layer.weight = torch.nn.Parameter(
                acttail_kernels.prepare_weight(layer.weight.data), requires_grad=False
            )
            layer.acttail_kernel_layout = True
        resolver = self.quant_config.resolver
        if resolver.loaded(layer) and get_tensor_model_parallel_rank() == 0:
            start_snapshot_writer(resolver)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.ops.acttail.sparse_linear(
            x,
            layer.weight,
            bias,
            layer.acttail_seg_bounds,
            list(layer.acttail_budget.seg_keep),
            layer.acttail_keep,
            layer.acttail_thr_guess,
            layer.acttail_stats,
            self.count_stats,
            self.decode_only,
            self.max_sparse_tokens,
        )
