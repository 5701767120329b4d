"""Reports of ``acttail eval`` results: terminal summaries, markdown tables and plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from acttail_vllm.eval.records import MultipleChoiceResult, PerplexityResult, SweepResult

#: The paper's relative perplexity change of ActTail against uniform budgets at 80% sparsity.
PAPER_CHANGE_AT_80: dict[str, float] = {"LLaMA-2-7B": -0.218, "LLaMA-2-13B": -0.401, "Mistral-7B": -0.094}
PAPER_SPARSITY = 0.8


def relative_change(ppl: float, baseline: float) -> float:
    return (ppl - baseline) / baseline


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def sweep_table(result: SweepResult) -> str:
    """Markdown: one row per run, its change against uniform at its sparsity, the paper's ActTail
    figures at 80%, and the command that reproduces the row."""
    paper = ", ".join(f"{name} {change:+.1%}" for name, change in PAPER_CHANGE_AT_80.items())
    rows = [["dense", "0%", f"{result.dense.ppl:.3f}", "", "", f"`{result.dense.command()}`"]]
    for run in result.runs:
        sparsity = run.profile.target_sparsity
        uniform = result.run("uniform", sparsity)
        change = ""
        if run.profile.method != "uniform" and uniform is not None:
            change = f"{relative_change(run.ppl, uniform.ppl):+.1%}"
        cited = paper if run.profile.method == "acttail" and math.isclose(sparsity, PAPER_SPARSITY) else ""
        rows.append([run.profile.method, f"{sparsity:.0%}", f"{run.ppl:.3f}", change, cited, f"`{run.command()}`"])
    return markdown_table(["method", "sparsity", "ppl", "vs uniform", "paper (LLaMA-2 / Mistral)", "command"], rows)


def plot_sweep(result: SweepResult, path: str | Path) -> None:
    """Perplexity against sparsity, one line per method, dense as a horizontal line (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(run.profile.method for run in result.runs):
        points = sorted((r.profile.target_sparsity, r.ppl) for r in result.runs if r.profile.method == method)
        ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(result.dense.ppl, color="black", linestyle="--", linewidth=1, label=f"dense ({result.dense.ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("global activation sparsity")
    ax.set_ylabel("perplexity")
    ax.set_title(
        f"{Path(result.dense.model).name} on {result.dense.text} ({result.dense.tokens_scored} tokens); "
        f"{result.estimator}, eps {result.eps:g}",
        fontsize="medium",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_perplexity(result: PerplexityResult) -> str:
    profile = result.profile
    rows = [
        ("model", result.model),
        (
            "profile",
            "dense"
            if profile is None
            else f"{result.label} ({profile.estimator}, eps {profile.eps:g}, "
            f"hash {profile.content_hash}, {profile.path})",
        ),
        (
            "text",
            f"{result.text}: {result.tokens_scored} tokens scored, context {result.context}, stride {result.stride}",
        ),
        ("engine", f"{result.engine} ({result.device}, {result.dtype}, batch {result.batch_size})"),
        ("nll / token", f"{result.nll:.4f}"),
        ("perplexity", f"{result.ppl:.4f}"),
        ("seconds", f"{result.seconds:.1f}"),
    ]
    return "\n".join(f"{key:<12} {value}" for key, value in rows)


def format_multiple_choice(result: MultipleChoiceResult) -> str:
    rows = [[t.task.value, str(t.items), f"{t.acc:.3f}", f"{t.acc_norm:.3f}"] for t in result.tasks]
    return f"{result.model}, {result.label}\n" + markdown_table(["task", "items", "acc", "acc_norm"], rows)


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar test on the items exactly one of two runs got right: the chance of
    a split at least this uneven if each such item were equally likely to go either way."""
    n = only_first + only_second
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_accuracy(first: MultipleChoiceResult, second: MultipleChoiceResult) -> str:
    """Markdown: two multiple-choice runs on the same items compared item by item, per task and
    over all tasks: accuracies, the difference, the items only one got right and McNemar's p."""
    tasks = {t.task: t for t in second.tasks}
    if set(tasks) != {t.task for t in first.tasks}:
        raise ValueError(
            f"the runs scored different tasks ({', '.join(t.task.value for t in first.tasks)} against "
            f"{', '.join(tasks)}): compare runs of the same `acttail eval mc --tasks`"
        )
    rows, totals = [], {"acc": [[], []], "acc_norm": [[], []]}
    for a in first.tasks:
        b = tasks[a.task]
        complete = all(len(t.right) == len(t.right_norm) == t.items for t in (a, b))
        if a.items != b.items or not complete:
            raise ValueError(
                f"{a.task.value}: the runs need the same items with per-item picks ({a.items} items, "
                f"{len(a.right)} picks against {b.items}, {len(b.right)}): run both with this version's "
                "`acttail eval mc` and the same --limit"
            )
        for metric, picks in (("acc", (a.right, b.right)), ("acc_norm", (a.right_norm, b.right_norm))):
            totals[metric][0] += picks[0]
            totals[metric][1] += picks[1]
            rows.append(_paired_row(a.task.value, metric, *picks))
    rows += [_paired_row("all", metric, *picks) for metric, picks in totals.items()]
    header = ["task", "metric", "items", first.label, second.label, "difference", "only first", "only second", "p"]
    return markdown_table(header, rows)


def _paired_row(task: str, metric: str, first: Sequence[bool], second: Sequence[bool]) -> list[str]:
    only_first = sum(a and not b for a, b in zip(first, second))
    only_second = sum(b and not a for a, b in zip(first, second))
    n = len(first)
    acc_first, acc_second = sum(first) / n, sum(second) / n
    return [
        task,
        metric,
        str(n),
        f"{acc_first:.3f}",
        f"{acc_second:.3f}",
        f"{acc_second - acc_first:+.3f}",
        str(only_first),
        str(only_second),
        f"{mcnemar_p(only_first, only_second):.2f}",
    ]


def write_json(record: BaseModel, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")


def write_result(record: BaseModel, markdown: str, out: str | Path, stem: str) -> None:
    """A benchmark's result as OUT/STEM.json (the record) and OUT/STEM.md (its tables)."""
    write_json(record, Path(out) / f"{stem}.json")
    (Path(out) / f"{stem}.md").write_text(markdown, encoding="utf-8")
