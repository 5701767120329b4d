"""Build an ActTail profile from a model's weights: alpha per projection, then budgets.

``profile_from_weights`` takes any stream of (layer, proj_name, weight) with weights in Hugging Face
(out, in) layout on any device; the vLLM plugin's loader hook feeds it views of loaded weights, the
CLI feeds it tensors read from files (``profile_model``).

Allocation settings and their defaults: ``allocation.AllocationSpec``.

- eigenvalue dtype ``None`` = by device: ``CPU_EIGEN_DTYPE = torch.float64`` on the CPU,
  ``CUDA_EIGEN_DTYPE = torch.float32`` on CUDA. On an H100, a Llama-2-13B-shaped model (280
  projections, 5120x5120 Gram matrices) took 60.0 s in float64 and 48.6 s in float32, ~99% of it in
  cuSOLVER's eigvalsh (0.21 s vs 0.17 s per matrix); alphas differed by at most 2.6e-6 (hill) and
  4.9e-5 (ww) relative. weightwatcher itself computes float32 singular values on CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch

from acttail_vllm import __version__
from acttail_vllm.profiling.allocation import AllocationSpec, allocate, weighted_mean
from acttail_vllm.profiling.esd import get_estimator, gram_eigenvalues
from acttail_vllm.profiling.fingerprint import WeightSample, model_fingerprint, weight_sample
from acttail_vllm.profiling.profile import (
    PROJECTION_NAMES,
    LayerProfile,
    ModelInfo,
    Profile,
    ProjectionProfile,
    layer_projection_names,
)
from acttail_vllm.profiling.weights import open_model

CPU_EIGEN_DTYPE = torch.float64
CUDA_EIGEN_DTYPE = torch.float32
#: Keys of ``stage_seconds``: waiting on the weight stream, eigenvalues, tail fit, rest.
STAGES: tuple[str, ...] = ("read", "eigenvalues", "fit", "fingerprint", "allocate")

WeightStream = Iterable[tuple[int, str, torch.Tensor]]


def _timed(stage_seconds: dict[str, float] | None, stage: str, fn, *args, **kwargs):
    """Run fn(*args, **kwargs); with a ``stage_seconds`` dict, add its wall time (GPU work included) there."""
    if stage_seconds is None:
        return fn(*args, **kwargs)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if isinstance(result, torch.Tensor) and result.is_cuda:
        torch.cuda.synchronize(result.device)
    stage_seconds[stage] = stage_seconds.get(stage, 0.0) + time.perf_counter() - start
    return result


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="alpha per projection", unit="proj", disable=not enabled)


def profile_from_weights(
    model_name: str,
    architecture: str,
    num_layers: int,
    weights: WeightStream,
    spec: AllocationSpec,
    *,
    eigen_dtype: torch.dtype | None = None,
    progress: bool = False,
    on_projection: Callable[[int, int], None] | None = None,
    stage_seconds: dict[str, float] | None = None,
) -> Profile:
    """Profile a model from its projection weights.

    ``weights`` must yield every (layer, proj_name) of ``num_layers`` layers once, in any order: all
    of PROJECTION_NAMES, or for a mixture-of-experts layer the attention projections alone. Alpha
    is computed on each tensor's own device in ``eigen_dtype`` (None: by device, see the module
    docstring). ``progress`` shows a progress bar; ``on_projection(done, total)`` is called after
    each projection. If given, ``stage_seconds`` receives seconds per entry of ``STAGES``.
    """
    fit = get_estimator(spec.estimator)
    alphas: dict[tuple[int, str], float] = {}
    samples: dict[tuple[int, str], WeightSample] = {}
    stream: Iterator = iter(weights)
    total = num_layers * len(PROJECTION_NAMES)
    with _progress(total, progress) as bar:
        while (item := _timed(stage_seconds, "read", next, stream, None)) is not None:
            layer, proj, weight = item
            key = (layer, proj)
            if proj not in PROJECTION_NAMES:
                raise ValueError(
                    f"unknown projection {proj!r} in layer {layer}: expected one of {', '.join(PROJECTION_NAMES)}"
                )
            if not 0 <= layer < num_layers:
                raise ValueError(f"layer index {layer} ({proj}) is outside 0..{num_layers - 1}")
            if key in alphas:
                raise ValueError(f"layer {layer} {proj} was given twice")
            if weight.ndim != 2:
                raise ValueError(
                    f"layer {layer} {proj}: expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}"
                )
            dtype = eigen_dtype or (CUDA_EIGEN_DTYPE if weight.is_cuda else CPU_EIGEN_DTYPE)
            evals = _timed(stage_seconds, "eigenvalues", gram_eigenvalues, weight, dtype)
            try:
                alphas[key] = _timed(stage_seconds, "fit", fit, evals)
            except ValueError as exc:
                raise ValueError(f"layer {layer} {proj}: {exc}") from None
            samples[key] = _timed(stage_seconds, "fingerprint", weight_sample, weight)
            bar.update()
            if on_projection is not None:
                on_projection(len(alphas), total)

    given = [{proj for (index, proj) in alphas if index == layer} for layer in range(num_layers)]
    expected = [(layer, proj) for layer in range(num_layers) for proj in layer_projection_names(given[layer])]
    missing = [f"layer {layer} {proj}" for layer, proj in expected if (layer, proj) not in alphas]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"no weights were given for {shown}")

    fingerprint = _timed(stage_seconds, "fingerprint", model_fingerprint, architecture, samples)
    model = ModelInfo(name=model_name, architecture=architecture, num_layers=num_layers, fingerprint=fingerprint)
    tails = {key: (alphas[key], samples[key].out_features, samples[key].in_features) for key in expected}
    return _timed(stage_seconds, "allocate", assemble_profile, model, tails, spec)


def assemble_profile(
    model: ModelInfo, tails: dict[tuple[int, str], tuple[float, int, int]], spec: AllocationSpec
) -> Profile:
    """The profile of ``model`` whose (layer, proj) -> (alpha, out_features, in_features) are
    ``tails``, with budgets allocated by ``spec``."""
    keys = sorted(tails)
    counts = [tails[key][1] * tails[key][2] for key in keys]
    alphas = [tails[key][0] for key in keys]
    sparsities = dict(zip(keys, allocate(alphas, counts, spec, [proj for _, proj in keys])))
    layers = [
        LayerProfile(
            index=layer,
            projections={
                proj: ProjectionProfile(
                    alpha=tails[(layer, proj)][0],
                    sparsity=sparsities[(layer, proj)],
                    out_features=tails[(layer, proj)][1],
                    in_features=tails[(layer, proj)][2],
                )
                for proj in PROJECTION_NAMES
                if (layer, proj) in tails
            },
        )
        for layer in range(model.num_layers)
    ]
    return Profile(
        tool_version=__version__,
        model=model,
        method=spec.method,
        estimator=spec.estimator,
        eps=spec.eps,
        s_max=spec.s_max,
        target_sparsity=spec.target,
        achieved_sparsity=weighted_mean(list(sparsities.values()), counts),
        layers=layers,
    )


def reallocated(profile: Profile, spec: AllocationSpec) -> Profile:
    """``profile``'s model and alphas with budgets allocated anew by ``spec``: alpha depends only on
    the weights and the estimator, so a new target, method or eps needs no eigenvalues."""
    if spec.estimator != profile.estimator:
        raise ValueError(f"alphas of estimator {profile.estimator!r} cannot be re-allocated as {spec.estimator!r}")
    tails = {
        (layer.index, proj): (p.alpha, p.out_features, p.in_features)
        for layer in profile.layers
        for proj, p in layer.projections.items()
    }
    return assemble_profile(profile.model, tails, spec)


def profile_model(
    model: str,
    spec: AllocationSpec,
    *,
    device: str | torch.device = "cpu",
    eigen_dtype: torch.dtype | None = None,
    progress: bool = False,
    stage_seconds: dict[str, float] | None = None,
) -> Profile:
    """Profile a model directory, GGUF file or hub id (see ``weights.open_model``) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available here: use the CPU")
    source = open_model(model)
    on_device = ((layer, proj, w.to(device)) for layer, proj, w in source.projections())
    return profile_from_weights(
        source.name,
        source.architecture,
        source.num_layers,
        on_device,
        spec,
        eigen_dtype=eigen_dtype,
        progress=progress,
        stage_seconds=stage_seconds,
    )
