"""User data files (``ntk_attention.train.tasks.user_data``): CSV and JSONL load into the kind's
columns; every bad file raises ``DataError`` (a ``ValueError``) whose message names the file,
the line where there is one, what was expected and what was found; nothing is written; and
``user_task`` splits the rows into seeded, disjoint train / validation / test splits."""

from __future__ import annotations

import json

import pytest

from ntk_attention.train.tasks import DataError, load_user_data, user_task


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(tmp_path, rows, name="data.jsonl"):
    return _write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


def test_csv_classification_loads_with_sorted_labels(tmp_path):
    path = _write(
        tmp_path, "d.csv", 'text,label,extra\n"hello, world",pos,1\nbad day,neg,2\n\nok,pos,3\n'
    )
    data = load_user_data(path, "classification")
    assert data.column_names == ["text", "label"]
    assert data.features["label"].names == ["neg", "pos"]
    assert data["text"] == ["hello, world", "bad day", "ok"]
    assert data["label"] == [1, 0, 1]


def test_label_names_fix_the_label_ids(tmp_path):
    path = _jsonl(tmp_path, [{"text": "a", "label": 2}, {"text": "b", "label": "0"}])
    data = load_user_data(path, "classification", label_names=["0", "1", "2"])
    assert data.features["label"].names == ["0", "1", "2"]
    assert data["label"] == [2, 0]


def test_integer_labels_sort_numerically(tmp_path):
    path = _jsonl(
        tmp_path, [{"text": str(i), "label": label} for i, label in enumerate([10, 2, 1])]
    )
    assert load_user_data(path, "classification").features["label"].names == ["1", "2", "10"]


def test_jsonl_generation_and_causal_lm(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "2+2=", "completion": " 4", "id": 7}])
    data = load_user_data(path, "generation")
    assert data.column_names == ["prompt", "completion"] and data[0] == {
        "prompt": "2+2=",
        "completion": " 4",
    }
    text = _write(tmp_path, "lm.csv", "text\nOnce upon a time\n")
    assert load_user_data(text, "causal-lm")["text"] == ["Once upon a time"]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nà,x\n".encode())
    assert load_user_data(path, "classification")["text"] == ["à"]


@pytest.mark.parametrize(
    ("name", "content", "kind", "message"),
    [
        ("empty.csv", "", "classification", r"empty.csv: file is empty; expected rows with columns text, label"),
        ("blank.jsonl", "\n  \n", "generation", r"blank.jsonl: file is empty; expected rows with columns prompt, completion"),
        ("header.csv", "text,label\n", "classification", r"header.csv: has a header but no rows"),
        (
            "cols.csv",
            "sentence,target\nhi,1\n",
            "classification",
            (
                r"cols.csv: missing column\(s\) text, label: classification data needs text, "
                r"label; found columns: sentence, target"
            ),
        ),
        (
            "cols.jsonl",
            '{"prompt": "a", "answer": "b"}\n',
            "generation",
            r"missing column\(s\) completion: generation data needs prompt, completion; found columns: prompt, answer",
        ),
        (
            "broken.jsonl",
            '{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n',
            "classification",
            r"broken.jsonl: line 3: malformed JSON \(Expecting value at column 24\)",
        ),
        ("list.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n', "classification", r"line 2: expected a JSON object, got list"),
        ("fields.csv", 'text,label\na,x\n"multi\nline",y\nb,x,extra\n', "classification", r"fields.csv: line 5: malformed CSV row: expected 2 fields \(text, label\), got 3"),
        ("null.jsonl", '{"text": "a", "label": "x"}\n{"text": null, "label": "x"}\n', "classification", r"line 2: column 'text' is missing or null"),
        ("partial.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', "classification", r"line 2: column 'label' is missing or null"),
        ("type.jsonl", '{"prompt": "a", "completion": 4}\n', "generation", r"line 1: column 'completion' must be text, got int"),
        ("data.txt", "text,label\n", "classification", r"data.txt: expected a .csv or .jsonl file, got suffix '.txt'"),
    ],
)  # fmt: skip
def test_bad_files_raise_data_error_naming_what_is_wrong(tmp_path, name, content, kind, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        load_user_data(path, kind)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # nothing written beside it


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.csv: data file not found"):
        load_user_data(tmp_path / "nope.csv", "classification")


def test_unknown_labels_are_listed_with_their_first_line(tmp_path):
    rows = [
        {"text": "a", "label": "pos"},
        {"text": "b", "label": "meh"},
        {"text": "c", "label": "meh"},
    ]
    path = _jsonl(tmp_path, rows + [{"text": "d", "label": "bad"}])
    with pytest.raises(
        DataError,
        match=r"2 unknown label\(s\): 'meh' \(line 2\), 'bad' \(line 4\); expected one of \['neg', 'pos'\]",
    ):
        load_user_data(path, "classification", label_names=["neg", "pos"])


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\nok,x\ncaf\xe9,y\n")
    with pytest.raises(DataError, match=r"latin.csv: line 3: expected UTF-8 text, found byte 0xe9"):
        load_user_data(path, "classification")


def test_data_error_is_a_value_error_and_unknown_kind_is_rejected(tmp_path):
    assert issubclass(DataError, ValueError)
    with pytest.raises(
        ValueError, match=r"kind must be one of \['causal-lm', 'classification', 'generation'\]"
    ):
        load_user_data(tmp_path / "x.csv", "image-classification")


def test_user_task_splits_are_seeded_disjoint_and_never_empty(tmp_path):
    path = _jsonl(tmp_path, [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(25)])
    task = user_task(path, "classification", seed=4)
    sizes = {split: len(data) for split, data in task.data.items()}
    assert sizes == {"train": 21, "validation": 2, "test": 2}  # round(0.1 * 25) = 2
    texts = {split: set(data["text"]) for split, data in task.data.items()}
    assert len(set.union(*texts.values())) == 25
    assert (
        user_task(path, "classification", seed=4).data["train"]["text"]
        == task.data["train"]["text"]
    )
    assert (
        user_task(path, "classification", seed=5).data["train"]["text"]
        != task.data["train"]["text"]
    )
    assert task.label_names == ("a", "b") and task.metric_names == ("accuracy", "macro_f1")
    # every kind of user data has an offline default model (issue 20: no hunting for paths)
    from ntk_attention import models
    from ntk_attention.train.tasks.user_data import DEFAULT_MODELS, USER_COLUMNS

    assert task.spec.default_model is models.MODEL_PATHS[DEFAULT_MODELS["classification"]]
    assert set(DEFAULT_MODELS) == set(USER_COLUMNS)
    tiny = user_task(
        _jsonl(tmp_path, [{"prompt": str(i), "completion": "x"} for i in range(3)], "t.jsonl"),
        "generation",
    )
    assert [len(d) for d in tiny.data.values()] == [1, 1, 1]
    limited = user_task(path, "classification", max_train=5, max_eval=1)
    assert [len(d) for d in limited.data.values()] == [5, 1, 1]


def test_user_task_needs_three_rows(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "a", "completion": "b"}] * 2)
    with pytest.raises(
        DataError, match="expected at least 3 rows for train / validation / test splits, got 2"
    ):
        user_task(path, "generation")
