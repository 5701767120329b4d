"""vLLM quantization config ``acttail``: which modules are sparse, and where their budgets come from.

Shaped like vLLM's own configs (``fp8.py``, ``awq_triton.py``): the config hands every decoder
projection an ``ActTailLinearMethod`` (``linear_method.py``) and everything else vLLM's unquantized
method. No math lives here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.platforms import current_platform

from acttail_vllm.errors import logs_startup_errors
from acttail_vllm.profiling.families import family_of
from acttail_vllm.serving.budgets import decoder_projection
from acttail_vllm.serving.dense_range import install_dense_range_pass
from acttail_vllm.serving.linear_method import ActTailLinearMethod, SparseModules
from acttail_vllm.serving.resolver import BudgetResolver
from acttail_vllm.serving.settings import (
    OVERRIDES_FILE_ORIGIN,
    OVERRIDES_ORIGIN,
    BudgetSource,
    SettingsError,
    SettingsOrigin,
    SparsityPolicy,
    resolve_budget_source,
)

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM prints it


class ActTailConfig(QuantizationConfig):
    """Config for ActTail activation sparsity; weights stay in the model's own dtype."""

    @logs_startup_errors
    def __init__(
        self, explicit: dict[str, Any] | None = None, explicit_origin: SettingsOrigin = OVERRIDES_ORIGIN
    ) -> None:
        super().__init__()
        # Validate what the user passed (config, env, profile file) now, in the process that parses
        # the command line: bad input stops `vllm serve` in seconds, before an engine starts. The
        # workers resolve it again with the model directory and check the profile's fingerprint.
        self.explicit = explicit
        self.explicit_origin = explicit_origin
        self.source: BudgetSource = resolve_budget_source(explicit, None, explicit_origin=explicit_origin)
        self._modules: SparseModules | None = None
        logger.info("ActTail: settings valid; budgets from %s", self.source.describe())

    def __repr__(self) -> str:
        return f"ActTailConfig(explicit={self.explicit})"

    def __getstate__(self) -> dict[str, Any]:
        # The modules are one worker's model: never ship them to another process.
        return {**self.__dict__, "_modules": None}

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
    def from_config(cls, config: dict[str, Any]) -> ActTailConfig:
        return cls(config)

    @classmethod
    def from_config_file(cls, path: str) -> ActTailConfig:
        """``--hf-overrides '{"quantization_config_file": "profile.json"}'``."""
        return cls({"profile": path}, OVERRIDES_FILE_ORIGIN)

    @property
    def modules(self) -> SparseModules:
        """This worker's sparse modules, made when vLLM builds the model."""
        if self._modules is None:  # before vLLM builds its compile backend, which takes the pass now
            vllm_config = get_current_vllm_config()
            self._modules = SparseModules(self._make_resolver(vllm_config), install_dense_range_pass(vllm_config))
        return self._modules

    def _make_resolver(self, vllm_config: VllmConfig) -> BudgetResolver:
        model_config = vllm_config.model_config
        architecture = (getattr(model_config.hf_config, "architectures", None) or ["<none>"])[0]
        family_of(architecture, f"model {model_config.model}")  # UnsupportedArchitecture names the supported ones
        # The model directory may hold a profile, which the front end could not know of; a profile
        # the front end already read is not read again.
        source = resolve_budget_source(
            self.explicit, model_config.model, known=self.source, explicit_origin=self.explicit_origin
        )
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        if source.kind == "loader_hook" and tp_size > 1:
            raise SettingsError(
                "ActTail's loader hook computes budgets from whole weight matrices, but tensor "
                f"parallel size is {tp_size} (--tensor-parallel-size): build a profile first (`acttail "
                "profile MODEL --sparsity S -o P.json`) and pass it (ACTTAIL_PROFILE=P.json)"
            )
        if source.settings.policy is SparsityPolicy.DECODE:
            _check_decode_policy_graph_mode(vllm_config, source.origin)
        logger.info("ActTail budgets: %s", source.describe())
        return BudgetResolver(source, model_config.model, architecture, tp_size)

    @logs_startup_errors
    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        modules = self.modules  # the first call checks the architecture and the settings
        if not isinstance(layer, LinearBase):
            return None  # embeddings, attention, experts: vLLM's unquantized methods
        proj = decoder_projection(prefix)
        if proj is None:
            return UnquantizedLinearMethod()  # lm_head, routers, shared experts, vision towers: dense
        return ActTailLinearMethod(modules, proj)


def _check_decode_policy_graph_mode(vllm_config: Any, origin: SettingsOrigin) -> None:
    """policy=decode reads each step's batch layout in Python: CUDA graphs may only cover
    decode-only batches, where every token is a decode token."""
    if vllm_config.model_config.enforce_eager or not current_platform.is_cuda_alike():
        return
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode.has_piecewise_cudagraphs():
        raise SettingsError(
            f"ActTail policy=decode (from {origin.name}) cannot run under cudagraph mode {mode.name}: "
            "mixed prefill/decode batches would replay one captured mask. Pass --compilation-config "
            '\'{"cudagraph_mode": "FULL_DECODE_ONLY"}\' or --enforce-eager, or use policy=all'
        )
