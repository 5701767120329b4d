"""The two engines of ``acttail eval``, which answer the same ``ScoreRequest``s (``scoring.py``):
``ReferenceEngine``, the transformers model (with the profile's TopK budgets applied by hooks,
``reference.sparsified``), and ``VllmEngine``, a real ``vllm serve`` with the plugin, asked for
prompt log-probabilities of token-id prompts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from acttail_vllm.eval.records import RunSettings
from acttail_vllm.eval.reference import decoder_layers
from acttail_vllm.eval.scoring import ScoreRequest, sliding_windows, token_logprobs

#: Seconds one batch may take on the vLLM server (long windows on a 2-core CPU are slow).
VLLM_REQUEST_TIMEOUT_S = 3600.0
#: ``advance(n)``: n more requests (a fraction while a batch is under way) are scored.
Advance = Callable[[float], None]


def _no_progress(n: float) -> None:
    """Nobody watches."""


@dataclass
class ReferenceEngine:
    """Scores requests with one batched forward of a transformers causal LM (right padding)."""

    model: torch.nn.Module
    device: torch.device

    @torch.inference_mode()
    def log_likelihoods(self, requests: Sequence[ScoreRequest], advance: Advance = _no_progress) -> list[torch.Tensor]:
        """One forward for all of ``requests``; ``advance`` hears of each decoder layer it passes."""
        lengths = [len(r.ids) for r in requests]
        ids = torch.zeros(len(requests), max(lengths), dtype=torch.long)
        for row, request in enumerate(requests):
            ids[row, : lengths[row]] = torch.tensor(request.ids)
        # Padding sits after every real token, so a causal mask already hides it; the padding mask
        # is only needed (and only paid for) when lengths differ.
        mask = None
        if min(lengths) != max(lengths):
            mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]).long().to(self.device)
        ids = ids.to(self.device)
        try:
            layers = decoder_layers(self.model)
        except AttributeError:  # a toy model (tests): no layers to hear from
            layers = ()

        def heard(*_) -> None:  # a forward hook that returned a value would replace the layer's output
            advance(len(requests) / len(layers))

        with ExitStack() as hooks:
            for layer in layers:
                hooks.callback(layer.register_forward_hook(heard).remove)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return [
            token_logprobs(logits[row, r.start - 1 : lengths[row] - 1], ids[row, r.start : lengths[row]]).cpu()
            for row, r in enumerate(requests)
        ]


class VllmEngine:
    """A ``vllm serve`` of the model (with ``--quantization acttail`` under a profile), asked for
    the log-probabilities of token-id prompts through the OpenAI completions API."""

    def __init__(
        self,
        settings: RunSettings,
        profile_path: Path | None,
        max_model_len: int,
        extra_args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
    ):
        """``extra_args`` go to ``vllm serve`` after the engine's own, ``extra_env`` to its environment."""
        from acttail_vllm.dev.server import VllmServer

        args = [
            "--dtype",
            settings.dtype,
            "--max-model-len",
            str(max_model_len),
            "--max-num-seqs",
            str(settings.batch_size),
        ]
        if settings.device == "cpu":
            args.append("--enforce-eager")  # torch.compile costs minutes per start on a small CPU
        args += list(extra_args)
        env = dict(extra_env or {})
        if profile_path is not None:
            # policy all: every token of every step sparsified, whatever the batch (the paper's
            # protocol, and what the reference engine computes)
            overrides = json.dumps({"quantization_config": {"quant_method": "acttail", "policy": "all"}})
            args += ["--quantization", "acttail", "--hf-overrides", overrides]
            env["ACTTAIL_PROFILE"] = str(profile_path.resolve())
        self.model = settings.model
        self.server = VllmServer(settings.model, args, env=env)
        self.client = None

    def __enter__(self) -> VllmEngine:
        import openai

        self.server.__enter__()
        self.client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="none", timeout=VLLM_REQUEST_TIMEOUT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def log_likelihoods(self, requests: Sequence[ScoreRequest], advance: Advance = _no_progress) -> list[torch.Tensor]:
        """One request per sequence, all in flight at once (the server batches them); ``advance``
        hears of each as it is answered."""
        results: list[torch.Tensor | None] = [None] * len(requests)
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            futures = {pool.submit(self._log_likelihood, request): index for index, request in enumerate(requests)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                advance(1)
        return results

    def _log_likelihood(self, request: ScoreRequest) -> torch.Tensor:
        # echo=True returns the prompt's tokens with their log-probabilities (the first has none),
        # followed by the one generated token that the API insists on.
        out = self.client.completions.create(
            model=self.model, prompt=list(request.ids), max_tokens=1, echo=True, logprobs=0, temperature=0.0
        )
        logprobs = out.choices[0].logprobs.token_logprobs
        if len(logprobs) != len(request.ids) + 1:
            raise RuntimeError(
                f"vLLM returned {len(logprobs)} log-probabilities for a prompt of {len(request.ids)} tokens "
                "plus one generated token: its echo behaviour is not what this code expects"
            )
        return torch.tensor(logprobs[request.start : len(request.ids)], dtype=torch.float64)


def score_requests(
    engine: ReferenceEngine | VllmEngine,
    requests: Sequence[ScoreRequest],
    batch_size: int,
    desc: str = "",
    progress: bool = False,
) -> list[torch.Tensor]:
    """Log-probabilities per request (in order), scored in batches of similar length; the progress
    bar moves within a batch (per decoder layer, or per answered request on vLLM)."""
    from tqdm import tqdm

    order = sorted(range(len(requests)), key=lambda i: len(requests[i].ids), reverse=True)
    results: list[torch.Tensor | None] = [None] * len(requests)
    bar_format = "{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}]"
    with tqdm(total=len(requests), desc=desc, unit="seq", disable=not progress, bar_format=bar_format) as bar:
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            for index, logprobs in zip(batch, engine.log_likelihoods([requests[i] for i in batch], bar.update)):
                results[index] = logprobs
            bar.update(first + len(batch) - bar.n)  # whole again after the fractions
    return results


def windowed_nll(
    engine: ReferenceEngine | VllmEngine,
    ids: Sequence[int],
    context: int,
    stride: int | None,
    batch_size: int,
    desc: str = "",
    progress: bool = False,
    bos: int | None = None,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and number of the tokens scored over ``sliding_windows``
    (each window led by ``bos`` if given)."""
    requests = [window.request(ids) for window in sliding_windows(len(ids), context, stride, bos)]
    logprobs = score_requests(engine, requests, batch_size, desc, progress)
    return -math.fsum(lp.sum().item() for lp in logprobs), sum(len(lp) for lp in logprobs)
