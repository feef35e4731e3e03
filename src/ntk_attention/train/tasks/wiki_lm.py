"""Wikipedia language modelling: the English Wikipedia XML excerpt that the ``gensim`` wheel
ships as test data (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p
000030302-shortened.bz2``: ~100 articles, ~480k words of wiki text). The file is read directly;
gensim is never imported (so its numpy/scipy requirements do not matter: install it --no-deps).

Markup is stripped simply (templates, tables, references, files, categories and the sections
from "See also" on are dropped; links keep their label), then each article's paragraphs are
packed into passages of at most ~256 words. Splits are by article, so no article straddles two
splits: articles are shuffled with the seed and cut at 80 % / 90 % of the words. Rows are
``title`` and ``text``; the metric is perplexity (exp of the mean token negative log-likelihood).
Default model: SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import bz2
import functools
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np

from ... import models
from .base import DataError, TaskSpec, package_dir

__all__ = ["DUMP", "SPEC", "build", "passages", "read_articles", "strip_markup"]

DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
PASSAGE_WORDS = 256
_SPLIT_AT = (0.8, 0.9)  # cumulative word fractions: train | validation | test
_END_SECTIONS = {"see also", "references", "notes", "external links", "further reading",
                 "bibliography", "sources", "footnotes", "citations"}  # fmt: skip

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_BLOCK = re.compile(
    r"<(gallery|math|timeline|imagemap|score|chem)\b[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE
)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROPPED_LINK = re.compile(r"(?:File|Image|Media|Category|[a-z]{2,3}(?:-[a-z]+)?):", re.IGNORECASE)
_EXTERNAL = re.compile(r"\[(?:https?:|//)[^\s\]]*\s*([^\]]*)\]")
_TAG = re.compile(r"<[^>]+>")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+$")


def _remove_nested(pattern: re.Pattern, text: str, replacement: Callable | str = "") -> str:
    """Replace innermost matches until none is left (templates, tables and links nest)."""
    while True:
        text, count = pattern.subn(replacement, text)
        if not count:
            return text


def _link_label(match: re.Match) -> str:
    """[[target|label]] -> label, [[target]] -> target; files, categories and interwiki -> ''."""
    inner = match.group(1)
    return "" if _DROPPED_LINK.match(inner) else inner.split("|", 1)[-1]


def strip_markup(wikitext: str) -> list[str]:
    """Plain-text paragraphs of an article's wikitext (headings become their own short
    paragraph; everything from a "See also" / "References" / ... heading on is dropped)."""
    text = html.unescape(_COMMENT.sub("", wikitext))  # the dump escapes &nbsp; etc. twice
    text = _BLOCK.sub("", _REF.sub("", text))
    text = _remove_nested(_INNER_TEMPLATE, text)
    text = _remove_nested(_INNER_TABLE, text)
    text = _remove_nested(_INNER_LINK, text, _link_label)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text).replace("'''", "").replace("''", "")
    paragraphs: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        heading = _HEADING.match(line)
        if heading and heading.group(1).strip().lower() in _END_SECTIONS:
            break
        if heading:
            line = heading.group(1)
        elif line.startswith(("|", "!", "{", "}", "__")):
            continue
        line = " ".join(line.lstrip("*#:; ").split())
        if line:
            paragraphs.append(line)
    return paragraphs


def _dump_path() -> Path:
    path = package_dir("gensim", pip_name="gensim") / DUMP
    if not path.is_file():
        raise DataError(
            f"gensim is installed but its Wikipedia test file is missing: expected {path}"
        )
    return path


def read_articles(path: Path | None = None) -> list[tuple[str, list[str]]]:
    """``(title, paragraphs)`` for every main-namespace, non-redirect article, in file order."""
    path = path if path is not None else _dump_path()
    articles = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            text = elem.findtext("{*}revision/{*}text") or ""
            redirect = elem.find("{*}redirect") is not None or text.lstrip().upper().startswith(
                "#REDIRECT"
            )
            if ns == "0" and not redirect:
                paragraphs = strip_markup(text)
                if paragraphs:
                    articles.append((elem.findtext("{*}title") or "", paragraphs))
            elem.clear()
    if not articles:
        raise DataError(f"{path}: expected Wikipedia articles, found none")
    return articles


def passages(paragraphs: Sequence[str], max_words: int = PASSAGE_WORDS) -> list[str]:
    """Consecutive paragraphs packed into passages of at most ``max_words`` words (a longer
    paragraph is cut at word boundaries); paragraphs are joined by a blank line."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        words = paragraph.split()
        pieces = [" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)]
        for piece in pieces:
            n = len(piece.split())
            if current and size + n > max_words:
                out.append("\n\n".join(current))
                current, size = [], 0
            current.append(piece)
            size += n
    if current:
        out.append("\n\n".join(current))
    return out


@functools.cache
def _default_articles() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The shipped dump, parsed once per process (~0.6 s)."""
    return tuple((title, tuple(paragraphs)) for title, paragraphs in read_articles())


def build(seed: int) -> datasets.DatasetDict:
    articles = _default_articles()
    order = np.random.default_rng(seed).permutation(len(articles))
    words = np.array([sum(len(p.split()) for p in articles[i][1]) for i in order])
    position = np.cumsum(words) / words.sum()  # fraction of all words up to this article
    split_of = np.searchsorted(np.array(_SPLIT_AT), position, side="left")
    rows: dict[str, dict[str, list[str]]] = {
        s: {"title": [], "text": []} for s in ("train", "validation", "test")
    }
    for article, split_id in zip(order, split_of, strict=False):
        title, paragraphs = articles[article]
        split = ("train", "validation", "test")[min(int(split_id), 2)]
        for passage in passages(paragraphs):
            rows[split]["title"].append(title)
            rows[split]["text"].append(passage)
    features = datasets.Features(
        {"title": datasets.Value("string"), "text": datasets.Value("string")}
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(columns, features=features)
            for split, columns in rows.items()
        }
    )


SPEC = TaskSpec(
    name="wiki-lm",
    kind="causal-lm",
    description="Wikipedia language modelling (gensim's enwiki excerpt), perplexity",
    source=f"gensim wheel: gensim/{DUMP}",
    build=build,
    default_model=models.smollm2_path,
    metric_names=("perplexity",),
)
