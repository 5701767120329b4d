"""End to end: `vllm serve SmolLM2 --quantization acttail` on CPU, through the OpenAI API.

Each test starts real vLLM servers (30-60 s each on 2 cores), so they are marked slow.
"""

from __future__ import annotations

import contextlib
import json
import re
import time

import openai
import pytest
import torch

from acttail_vllm.dev.server import VllmServer
from acttail_vllm.profiling.profile import Profile
from acttail_vllm.serving.budgets import kept_count
from tests.conftest import SCHEMA1_PROFILE, shipped_profile

pytestmark = pytest.mark.slow

# float32 so that the plugin, dense vLLM and the PyTorch reference differ only by kernel rounding.
# Eager mode: torch.compile costs 2-3 min per start on this CPU; one server (served_50) keeps it.
COMMON_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8")
SERVE_ARGS = (*COMMON_ARGS, "--enforce-eager")
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]
# Reference and vLLM compute the same function with different kernels (fused norms, compiled
# graphs); a channel whose |x| sits at the TopK threshold can flip between them and move a few
# tokens' logprobs by up to ~0.5. So: a bound on the mean, and most tokens must agree closely.
LOGPROB_MEAN_TOL = 0.02
LOGPROB_CLOSE = 0.01
CLOSE_SHARE = 0.9


def greedy_texts(server: VllmServer, model: str) -> list[str]:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    out = client.completions.create(model=model, prompt=PROMPTS, max_tokens=24, temperature=0.0)
    return [choice.text for choice in sorted(out.choices, key=lambda c: c.index)]


def metric_values(server: VllmServer, name: str) -> dict[tuple[str, str], float]:
    """{(layer, projection): value} of one ActTail metric on the server's /metrics."""
    text = server.metrics()
    pattern = re.compile(rf'^{name}\{{layer="(\d+)",projection="(\w+)"\}} (\S+)$', re.M)
    return {(layer, proj): float(value) for layer, proj, value in pattern.findall(text)}


def test_sparsity_zero_equals_dense(smollm2_dir):
    model = str(smollm2_dir)
    with VllmServer(model, SERVE_ARGS) as dense:
        dense_texts = greedy_texts(dense, model)
    with VllmServer(model, (*SERVE_ARGS, "--quantization", "acttail"), env={"ACTTAIL_SPARSITY": "0"}) as sparse:
        sparse_texts = greedy_texts(sparse, model)
    assert sparse_texts == dense_texts
    assert all(len(t) > 0 for t in dense_texts)


@pytest.fixture(scope="module")
def served_50(smollm2_dir):
    """A 50% SmolLM2 profile in schema version 1 (alphapruning budgets), passed through vLLM's own
    --hf-overrides surface, under vLLM's default torch.compile. Its TopK thresholds on the prompt of
    ``test_prompt_logprobs_match_reference`` sit clear of float32 ties; the shipped acttail 50%
    profile has a threshold within rounding of a tie at the prompt's 7th token, where vLLM and the
    reference keep different channels, and every later token's logprob differs with them (mean
    0.32 over the prompt)."""
    profile = SCHEMA1_PROFILE
    config = {"quant_method": "acttail", "profile": str(profile), "policy": "all"}  # prompts sparsified too
    overrides = json.dumps({"quantization_config": config})
    with VllmServer(
        str(smollm2_dir),
        (*COMMON_ARGS, "--quantization", "acttail", "--hf-overrides", overrides),
        env={"ACTTAIL_METRICS_INTERVAL_S": "0.5"},
    ) as server:
        yield server, Profile.load(profile)


def test_openai_completions_and_chat(served_50, smollm2_dir):
    server, _ = served_50
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    completion = client.completions.create(
        model=str(smollm2_dir), prompt="Hello, my name is", max_tokens=8, temperature=0.0
    )
    assert completion.usage.completion_tokens == 8
    chat = client.chat.completions.create(
        model=str(smollm2_dir),
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=8,
        temperature=0.0,
    )
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens > 0


def test_prompt_logprobs_match_reference(served_50, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from acttail_vllm.eval.reference import sparsified

    server, profile = served_50
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    text = (
        "The history of the city goes back more than two thousand years, when traders first "
        "settled on the banks of the river and built a small market."
    )
    out = client.completions.create(
        model=str(smollm2_dir), prompt=text, max_tokens=1, echo=True, logprobs=0, temperature=0.0
    )
    served = out.choices[0].logprobs.token_logprobs[1:-1]  # first prompt token has none; last is generated

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad(), sparsified(model, profile):
        logits = model(ids).logits[0, :-1]
    reference = torch.log_softmax(logits.double(), -1).gather(1, ids[0, 1:, None])[:, 0].tolist()

    assert_logprobs_close(served, reference)
    # and sparsity changed the model: the dense reference differs by far more
    with torch.no_grad():
        dense = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
    assert_logprobs_differ(dense.tolist(), reference)


def assert_logprobs_close(served: list[float], reference: list[float]) -> None:
    assert len(served) == len(reference)
    diffs = [abs(a - b) for a, b in zip(served, reference)]
    assert sum(diffs) / len(diffs) < LOGPROB_MEAN_TOL, diffs
    assert sum(d < LOGPROB_CLOSE for d in diffs) >= CLOSE_SHARE * len(diffs), diffs


def assert_logprobs_differ(a: list[float], b: list[float]) -> None:
    """Far apart: the runs differ by sparsity, not by kernel rounding."""
    assert sum(abs(x - y) for x, y in zip(a, b)) / len(a) > 5 * LOGPROB_MEAN_TOL


@pytest.mark.parametrize(
    "option", [{"policy": "decode"}, {"policy": "all", "max_sparse_tokens": 1}], ids=["policy", "max_tokens"]
)
def test_decode_steps_alone_sparsified(smollm2_dir, option):
    """policy=decode, or max_sparse_tokens=1 for one request (its prompt is one step of many
    tokens, each later step one token): the prompt (prefill) runs dense and every generated token
    (decode) sparse, against the reference run the same way: dense prompt into the KV cache,
    sparsified steps. Compared on each position's top-5 logprobs (what vLLM returns), not only the
    greedy token's."""
    from transformers import AutoModelForCausalLM

    from acttail_vllm.eval.reference import sparsified

    profile_path = shipped_profile("acttail", 50)
    config = {"quant_method": "acttail", "profile": str(profile_path), **option}
    args = (*SERVE_ARGS, "--quantization", "acttail", "--hf-overrides", json.dumps({"quantization_config": config}))
    text = "The history of the city goes back more than two thousand years, when traders first settled"
    # The served prompt runs vLLM's oneDNN GEMM and its decode steps sum the kept products in
    # another order than the reference's GEMMs: once a TopK threshold falls within that rounding
    # (here at the 7th new token on this CPU), the two keep different channels and every later
    # token differs (docs/reproducibility.md).
    new_tokens = 6
    with VllmServer(str(smollm2_dir), args, env={"ACTTAIL_METRICS_INTERVAL_S": "0.5"}) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        before = server.settled_token_counts()
        # vLLM's profile and warm-up runs went through the sparse modules before the engine was ready
        # (2048 tokens on this CPU); the counters leave them out
        assert set(before) == {"sparse_gemv", "selection_dense_gemm", "unsparsified"}
        assert sum(before.values()) == 0
        out = client.completions.create(
            model=str(smollm2_dir),
            prompt=text,
            max_tokens=new_tokens,
            echo=True,
            logprobs=5,
            temperature=0.0,
            extra_body={"return_tokens_as_token_ids": True},
        )
        after = server.settled_token_counts()
    logprobs = out.choices[0].logprobs
    ids = [int(token.removeprefix("token_id:")) for token in logprobs.tokens]
    num_prompt = len(ids) - new_tokens
    # The metrics say the same: the prompt's rows unsparsified, one row per decode step through the
    # CPU's sparse GEMV.
    assert after == {"sparse_gemv": new_tokens - 1, "selection_dense_gemm": 0, "unsparsified": num_prompt}
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    profile = Profile.load(profile_path)

    def reference_logprobs(sparse_decode: bool) -> torch.Tensor:
        """[len(ids) - 1, vocab]: row i predicts ids[i + 1]; the prompt in one dense pass, then the
        generated tokens one at a time on the KV cache."""
        with torch.no_grad():
            step = model(torch.tensor([ids[:num_prompt]]), use_cache=True)
            rows = [step.logits[0]]
            for token in ids[num_prompt:-1]:
                with sparsified(model, profile) if sparse_decode else contextlib.nullcontext():
                    step = model(torch.tensor([[token]]), past_key_values=step.past_key_values, use_cache=True)
                rows.append(step.logits[0])
        return torch.log_softmax(torch.cat(rows).double(), -1)

    def top5(positions: range, reference: torch.Tensor) -> tuple[list[float], list[float]]:
        """vLLM's top-5 logprobs at these positions of ids, and the reference's for the same tokens."""
        served, ref = [], []
        for pos in positions:
            for token, value in logprobs.top_logprobs[pos].items():
                served.append(value)
                ref.append(reference[pos - 1, int(token.removeprefix("token_id:"))].item())
        return served, ref

    sparse, dense = reference_logprobs(True), reference_logprobs(False)
    prefill, decode = range(1, num_prompt + 1), range(num_prompt + 1, len(ids))  # num_prompt: from the prefill
    assert_logprobs_close(*top5(prefill, sparse))  # the prompt and the first new token: dense
    assert_logprobs_close(*top5(decode, sparse))  # each later token: its decode step sparse
    assert_logprobs_differ(*top5(decode, dense))  # which differs from dense decoding


def test_kept_fraction_is_exact(served_50, smollm2_dir):
    server, profile = served_50
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    client.completions.create(model=str(smollm2_dir), prompt=PROMPTS, max_tokens=4, temperature=0.0)
    time.sleep(1.5)  # one snapshot interval (0.5 s) and then some
    kept = metric_values(server, "acttail_kept_fraction_ratio")
    assert len(kept) == 7 * profile.model.num_layers
    for (layer, name), fraction in kept.items():
        entry = profile.layers[int(layer)].projections[name]
        expected = kept_count(entry.sparsity, entry.in_features) / entry.in_features
        assert fraction == pytest.approx(expected, abs=1e-12), (layer, name)
        assert abs(fraction - (1 - entry.sparsity)) <= 0.5 / entry.in_features


def budgets_ready_seconds(log: str) -> float:
    return float(re.search(r"budgets ready in ([\d.]+) s", log).group(1))


def test_loader_hook_writes_then_reuses_profile(smollm2_dir, tmp_path):
    env = {"ACTTAIL_CACHE": str(tmp_path), "ACTTAIL_SPARSITY": "0.5"}
    args = (*SERVE_ARGS, "--quantization", "acttail")
    with VllmServer(str(smollm2_dir), args, env=env) as first:
        first_budgets = metric_values(first, "acttail_projection_sparsity_ratio")
    written = list((tmp_path / "profiles").glob("*.json"))
    assert len(written) == 1
    assert "computing budgets from the loaded weights" in first.log()
    profile = Profile.load(written[0])
    assert profile.target_sparsity == 0.5 and profile.method == "acttail"

    with VllmServer(str(smollm2_dir), args, env=env) as second:
        second_budgets = metric_values(second, "acttail_projection_sparsity_ratio")
        assert greedy_texts(second, str(smollm2_dir))
    assert "reusing cached profile" in second.log()
    assert budgets_ready_seconds(second.log()) < budgets_ready_seconds(first.log())
    # Same budgets (greedy text is not compared: at 50% sparsity a channel at the TopK threshold
    # can flip with the batch layout vLLM picks, and the continuation diverges from there).
    assert len(first_budgets) == 7 * profile.model.num_layers
    assert second_budgets == first_budgets
    assert list((tmp_path / "profiles").glob("*.json")) == written


def failed_start(model: str, args: tuple[str, ...], env: dict[str, str]) -> str:
    server = VllmServer(model, (*SERVE_ARGS, "--quantization", "acttail", *args), env=env).start()
    try:
        assert server.wait_exit(timeout_s=300) != 0
    finally:
        server.stop()
    return server.log()


def acttail_error(log: str) -> str:
    """The one ERROR line acttail logs for a startup error (its message), which must come before
    vLLM's own report of the failure (a traceback, or "Engine core initialization failed")."""
    lines = [line for line in log.splitlines() if re.search(r" ERROR .*\[errors\.py:\d+\] ", line)]
    assert len(lines) == 1, log[-3000:]
    first_traceback = log.find("Traceback (most recent call last)")
    assert first_traceback == -1 or log.index(lines[0]) < first_traceback
    return lines[0].split("] ", 1)[1]


def test_bad_input_stops_the_config_before_any_engine(tmp_path, monkeypatch):
    """`vllm serve` builds the quantization config in its front-end process, before any engine:
    bad settings and unreadable profiles must stop it there, in seconds."""
    from acttail_vllm.profiling.profile import ProfileError
    from acttail_vllm.serving.config import ActTailConfig
    from acttail_vllm.serving.settings import SettingsError

    monkeypatch.setenv("ACTTAIL_SPARSITY", "1.2")
    with pytest.raises(SettingsError, match="env ACTTAIL_SPARSITY"):
        ActTailConfig()
    monkeypatch.delenv("ACTTAIL_SPARSITY")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{")
    with pytest.raises(ProfileError, match="is not valid JSON"):
        ActTailConfig({"profile": str(corrupt)})
    assert ActTailConfig({"sparsity": 0.5}).explicit == {"sparsity": 0.5}


def test_corrupt_profile_stops_startup(smollm2_dir, tmp_path):
    bad = tmp_path / "corrupt.json"
    bad.write_text(shipped_profile("acttail", 50).read_text()[:500])
    log = failed_start(str(smollm2_dir), (), {"ACTTAIL_PROFILE": str(bad)})
    assert acttail_error(log).startswith(f"profile {bad} (from env ACTTAIL_PROFILE) is not valid JSON")


def test_profile_for_another_model_stops_startup(smollm2_dir):
    """In the engine process, after the weights load: the reason comes as acttail's ERROR line
    before vLLM's generic 'Engine core initialization failed'."""
    # Random weights of the same shapes are another model: the fingerprint must catch it.
    profile = shipped_profile("acttail", 50)
    log = failed_start(str(smollm2_dir), ("--load-format", "dummy"), {"ACTTAIL_PROFILE": str(profile)})
    message = acttail_error(log)
    assert message.startswith(f"profile {profile} (from env ACTTAIL_PROFILE) was made for model")
    fix = f"build one for this model with `acttail profile {smollm2_dir} --sparsity S -o FILE` and pass that"
    assert message.endswith(fix)
    assert log.index(message) < log.index("Engine core initialization failed")


def test_sparsity_out_of_range_stops_startup(smollm2_dir):
    log = failed_start(str(smollm2_dir), (), {"ACTTAIL_SPARSITY": "1.2"})
    assert acttail_error(log) == (
        "invalid ActTail settings from env ACTTAIL_SPARSITY: sparsity: Input should be less than 1 (got 1.2): "
        "correct or unset ACTTAIL_SPARSITY"
    )
