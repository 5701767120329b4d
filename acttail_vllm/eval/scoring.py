"""The scoring math of ``acttail eval``, pure torch: windows over a token stream, token
log-likelihoods, perplexity, and multiple-choice picks. No model, no engine.

Every engine answers the same question, a ``ScoreRequest``: the log-probabilities of
``ids[start:]``, each token given all tokens before it in ``ids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``ids[start:]`` given the prefix; ``start >= 1`` since token 0 has no context."""

    ids: tuple[int, ...]
    start: int

    def __post_init__(self) -> None:
        if not 1 <= self.start < len(self.ids):
            raise ValueError(f"start must be in [1, {len(self.ids) - 1}] for {len(self.ids)} tokens, got {self.start}")

    @property
    def targets(self) -> tuple[int, ...]:
        return self.ids[self.start :]


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` of the stream go through the model, after ``bos`` if it is set;
    ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int
    bos: int | None = None

    def request(self, stream: Sequence[int]) -> ScoreRequest:
        tokens = tuple(stream[self.begin : self.end])
        if self.bos is None:
            return ScoreRequest(tokens, self.score_from - self.begin)
        return ScoreRequest((self.bos, *tokens), self.score_from - self.begin + 1)


def sliding_windows(num_tokens: int, context: int, stride: int | None = None, bos: int | None = None) -> list[Window]:
    """Windows of ``context`` tokens every ``stride`` tokens (default: a window's length, no overlap).

    Each token is scored once, in the first window where it is new, and only if that window holds
    at least one token before it: with no overlap the first token of every window goes unscored
    (as in the Hugging Face perplexity recipe); with overlap the older tokens serve as context only.

    With ``bos`` (for a tokenizer that starts every text with it: a model trained so degrades
    without it), every window is ``bos`` and ``context - 1`` tokens of the stream, all of them
    scored, and a stride of ``context`` means no overlap too; the stream must not start with ``bos``.
    """
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens (one to condition on, one to score), got {context}")
    if stride is not None and not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    span = context if bos is None else context - 1  # stream tokens per window
    stride = span if stride is None else min(stride, span)
    first_scored = 1 if bos is None else 0  # the first token of a window has no context but bos
    if num_tokens < first_scored + 1:
        raise ValueError(f"the text has {num_tokens} token(s): at least {first_scored + 1} are needed to score one")
    windows = []
    scored_until = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + span, num_tokens)
        score_from = max(scored_until, begin + first_scored)
        if score_from < end:
            windows.append(Window(begin, end, score_from, bos))
        scored_until = end
        if end == num_tokens:
            break
    return windows


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 [T]: log softmax(logits[t])[targets[t]]; softmax in float32 whatever the logits' dtype."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [T, V] and targets [T], got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(1, targets.long().reshape(-1, 1))[:, 0].double()


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood (nats) per scored token."""
    if tokens < 1:
        raise ValueError("no tokens were scored: perplexity is undefined")
    return math.exp(nll_sum / tokens)


def continuation_request(context_ids: Sequence[int], whole_ids: Sequence[int]) -> ScoreRequest:
    """Score a continuation from the tokens of ``context`` and of ``context + continuation``.

    The whole string is tokenised as one (as the model saw such text in training). Scored are the
    whole's tokens from the first that differs from the context's tokens: the continuation's tokens,
    plus the token that straddles the join where BPE merges across it.
    """
    start = 0
    for context_token, whole_token in zip(context_ids, whole_ids):
        if context_token != whole_token:
            break
        start += 1
    if start == 0:
        raise ValueError("the context contributes no token of its own: a continuation needs one before it")
    if start >= len(whole_ids):
        raise ValueError("the continuation adds no tokens to the context")
    return ScoreRequest(tuple(whole_ids), start)


def pick_choice(logprob_sums: Sequence[float], normalisers: Sequence[float] | None = None) -> int:
    """Index of the best choice by summed log-likelihood, divided by ``normalisers`` if given
    (e.g. each continuation's length in characters: accuracy 'acc_norm'). Ties go to the first."""
    scores = list(logprob_sums)
    if normalisers is not None:
        if len(normalisers) != len(scores) or any(n <= 0 for n in normalisers):
            raise ValueError(
                f"need one positive normaliser per choice, got {list(normalisers)} for {len(scores)} choices"
            )
        scores = [s / n for s, n in zip(scores, normalisers)]
    return max(range(len(scores)), key=scores.__getitem__)
