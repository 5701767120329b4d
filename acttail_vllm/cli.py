"""The ``acttail`` command line.

Commands live in a registry: ``register_command(name, help, configure)`` decorates the function that
runs the command, ``configure`` adds its arguments to its subparser. Modules that add commands are
listed in ``COMMAND_MODULES`` and imported when the parser is built. Only the command being run is
configured, so that ``acttail --help`` and ``--version`` start in a fraction of a second: keep every
heavy import (torch, pydantic models, vLLM, transformers) inside ``configure`` and the command
function, never at the top of a command module (``tests/test_profiler_cli.py`` checks it). Errors a
user can fix (``ActTailError``, ValueError and its subclasses, OSError) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from acttail_vllm import __version__
from acttail_vllm.errors import ActTailError, one_line

#: Modules that register further commands on import.
COMMAND_MODULES: tuple[str, ...] = ("acttail_vllm.eval.cli",)
EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``run(args) -> exit code or None`` as ``acttail NAME``."""

    def decorate(run: Callable[[argparse.Namespace], int | None]):
        if name in COMMANDS:
            raise ValueError(f"acttail command {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return decorate


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        shows = default is not None and default is not False and default != "" and default != argparse.SUPPRESS
        if action.option_strings and shows and "%(default)" not in help:
            shown = ",".join(str(getattr(v, "value", v)) for v in default) if isinstance(default, list) else default
            help += f" (default: {shown})".replace("%", "%%")
        return help


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (give a fraction such as 0.8)") from None


def _configure_profile(parser: argparse.ArgumentParser) -> None:
    from acttail_vllm.profiling.allocation import DEFAULT_EPS, DEFAULT_ESTIMATOR, DEFAULT_METHOD, DEFAULT_S_MAX, METHODS
    from acttail_vllm.profiling.esd import ESTIMATORS

    parser.add_argument("model", metavar="MODEL", help="Hugging Face model directory, GGUF file, or hub id")
    parser.add_argument("--sparsity", type=_fraction, required=True, help="global target sparsity, e.g. 0.8")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help="acttail: budgets from per-type loss costs, moved within a type by alpha (docs/allocation.md); "
        "alphapruning: larger alpha gets more sparsity (AlphaPruning's rule); uniform: the target everywhere",
    )
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), default=DEFAULT_ESTIMATOR, help="alpha estimator")
    parser.add_argument(
        "--eps",
        type=_fraction,
        default=DEFAULT_EPS,
        help="alphapruning only: relative spread of budgets around the target",
    )
    parser.add_argument(
        "--s-max",
        type=_fraction,
        default=DEFAULT_S_MAX,
        help="cap on any projection's sparsity (alphapruning, acttail)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where eigenvalues are computed")
    parser.add_argument(
        "--eigen-dtype",
        choices=("auto", "float64", "float32"),
        default="auto",
        help="dtype of the eigenvalue computation (auto: float64 on cpu, float32 on cuda)",
    )
    parser.add_argument("-o", "--output", required=True, help="profile JSON to write")


@register_command("profile", "compute alpha per projection and write a sparsity profile", _configure_profile)
def _profile(args: argparse.Namespace) -> None:
    import torch

    from acttail_vllm.profiling.allocation import AllocationSpec
    from acttail_vllm.profiling.builder import profile_model

    profile = profile_model(
        args.model,
        AllocationSpec(args.sparsity, args.method, args.estimator, args.eps, args.s_max),
        device=args.device,
        eigen_dtype=None if args.eigen_dtype == "auto" else getattr(torch, args.eigen_dtype),
        progress=True,
    )
    profile.save(args.output)
    projections = [p for layer in profile.layers for p in layer.projections.values()]
    alphas = [p.alpha for p in projections]
    sparsities = [p.sparsity for p in projections]
    print(
        f"wrote {args.output}: {profile.model.name}, {len(projections)} projections, "
        f"alpha {min(alphas):.3f}..{max(alphas):.3f}, sparsity {min(sparsities):.3f}..{max(sparsities):.3f}, "
        f"achieved {profile.achieved_sparsity:.6f} (target {profile.target_sparsity})"
    )


def _configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", metavar="PROFILE", help="profile JSON")
    parser.add_argument("--plot", metavar="PNG", help="also draw alpha and sparsity per layer into this image")


def format_table(profile) -> str:
    """Per-layer table: alpha and sparsity of each projection."""
    from acttail_vllm.profiling.profile import PROJECTION_NAMES

    cell = 15
    header = "layer" + "".join(f"{name:>{cell}}" for name in PROJECTION_NAMES)
    units = "     " + "".join(f"{'alpha  spars':>{cell}}" for _ in PROJECTION_NAMES)

    def entry(projection) -> str:
        if projection is None:  # a mixture-of-experts layer's MLP: experts, dense
            return f"{'-':>{cell - 7}}{'-':>7}"
        return f"{projection.alpha:>{cell - 7}.3f}{projection.sparsity:>7.3f}"

    rows = [
        f"{layer.index:5d}" + "".join(entry(layer.projections.get(name)) for name in PROJECTION_NAMES)
        for layer in profile.layers
    ]
    model = profile.model
    summary = (
        f"{model.name} ({model.architecture}, {model.num_layers} layers, fingerprint {model.fingerprint[:12]}...)\n"
        f"method {profile.method}, estimator {profile.estimator}, eps {profile.eps}, s_max {profile.s_max}, "
        f"target {profile.target_sparsity}, achieved {profile.achieved_sparsity:.6f}, "
        f"content hash {profile.content_hash()}"
    )
    return "\n".join([summary, header, units, *rows])


def plot_profile(profile, path: str) -> None:
    """Two panels, alpha and sparsity against layer index, one line per projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from acttail_vllm.profiling.profile import PROJECTION_NAMES

    index = [layer.index for layer in profile.layers]
    fig, (ax_alpha, ax_sparsity) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    nan = float("nan")  # a mixture-of-experts layer has no MLP projections: a gap in their lines
    for name in PROJECTION_NAMES:
        entries = [layer.projections.get(name) for layer in profile.layers]
        ax_alpha.plot(index, [nan if p is None else p.alpha for p in entries], marker=".", label=name)
        ax_sparsity.plot(index, [nan if p is None else p.sparsity for p in entries], marker=".", label=name)
    ax_sparsity.axhline(profile.target_sparsity, color="black", linestyle="--", linewidth=1, label="target")
    ax_alpha.set_ylabel(f"alpha ({profile.estimator})")
    ax_sparsity.set_ylabel("sparsity")
    ax_sparsity.set_xlabel("layer")
    ax_alpha.legend(ncol=4, fontsize="small")
    ax_sparsity.legend(ncol=4, fontsize="small")
    fig.suptitle(f"{profile.model.name}: {profile.method}, target {profile.target_sparsity}, eps {profile.eps}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@register_command("inspect", "print a profile's per-layer table, optionally plot it", _configure_inspect)
def _inspect(args: argparse.Namespace) -> None:
    from acttail_vllm.profiling.profile import Profile

    profile = Profile.load(args.profile)
    print(format_table(profile))
    if args.plot:
        plot_profile(profile, args.plot)
        print(f"wrote {args.plot}")


@register_command(
    "prepare-smollm2",
    "print the cached SmolLM2-135M-Instruct model directory, creating it if needed",
    lambda parser: None,
)
def _prepare_smollm2(args: argparse.Namespace) -> None:
    from acttail_vllm.dev.models import ensure_smollm2

    print(ensure_smollm2())


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; only ``command``'s arguments are added (that may import)."""
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="acttail", description="ActTail activation sparsity for vLLM")
    parser.add_argument("--version", action="version", version=f"acttail {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for registered in COMMANDS.values():
        sub = subparsers.add_parser(
            registered.name, help=registered.help, description=registered.help, formatter_class=HelpWithDefaults
        )
        if registered.name == command:
            registered.configure(sub)
        sub.set_defaults(run=registered.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top level has only flags without values, so the first other word names the command.
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return args.run(args) or 0
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ActTailError, ValueError, OSError) as exc:
        print(f"acttail {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # `python -m acttail_vllm.cli`: commands register with the imported module
    from acttail_vllm.cli import main as package_main

    sys.exit(package_main())
