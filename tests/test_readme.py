"""Every Python snippet of README.md runs as written, in a fresh namespace and an empty working
folder: the op and the adapter snippets in the fast suite (the adapter's on MiniLM), the
compressed-prompt snippet, which reads the state `compress-prompt` writes, in the slow suite
after running that command as the README does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _snippet(marker: str) -> str:
    found = [code for code in _snippets() if marker in code]
    assert len(found) == 1, f"one README snippet with {marker!r}, found {len(found)}"
    return found[0]


def test_every_snippet_is_run_by_a_test():
    markers = ("ntk_attention.ops import", "get_ntk_model", "compress_prompt")
    assert len(_snippets()) == len(markers)
    for code in _snippets():
        assert sum(marker in code for marker in markers) == 1


def test_the_op_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_snippet("ntk_attention.ops import"), "README.md", "exec"), namespace)
    assert namespace["out"].shape == namespace["q"].shape


@pytest.mark.usefixtures("minilm_dir")  # the snippet's model
def test_the_adapter_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_snippet("get_ntk_model"), "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert type(namespace["model"]).__name__ == "NTKModel"


@pytest.mark.slow
def test_the_compressed_prompt_snippet_runs(tmp_path, monkeypatch):
    from ntk_attention.cli import main

    monkeypatch.chdir(tmp_path)
    import ntk_attention.train.tasks.wiki_lm as wiki

    Path("prompt.txt").write_text("\n\n".join(wiki.read_articles()[2][1])[:2500])
    assert main(["compress-prompt", "--model", "smollm2-135m", "--prompt-file", "prompt.txt",
                 "--output", "runs/prompt-state"]) == 0
    namespace: dict = {}
    exec(compile(_snippet("compress_prompt"), "README.md", "exec"), namespace)
    assert type(namespace["ntk"]).__name__ == "NTKModel"
