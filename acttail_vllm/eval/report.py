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


def write_json(record: BaseModel, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")


def write_result(record: BaseModel, markdown: str, out: str | Path, stem: str) -> None:
    """A benchmark's result as OUT/STEM.json (the record) and OUT/STEM.md (its tables)."""
    write_json(record, Path(out) / f"{stem}.json")
    (Path(out) / f"{stem}.md").write_text(markdown, encoding="utf-8")
