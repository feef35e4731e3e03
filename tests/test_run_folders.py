"""One output folder holds one kind of run: fine-tuning, comparing and compressing refuse a
folder that holds another kind's record (train.run_folder.RUN_RECORDS), before writing
anything."""

from __future__ import annotations

import pytest

from ntk_attention.cli import EXIT_BAD_INPUT, main
from ntk_attention.train.run_folder import RUN_RECORDS


@pytest.mark.parametrize("command", [
    ["finetune", "--method", "ntk"],
    ["compare", "--methods", "ntk", "lora"],
])
@pytest.mark.parametrize("record", ["compression.json", "conversion.json"])
def test_training_refuses_a_folder_holding_a_compressed_prompt(tmp_path, capsys, command, record):
    run = tmp_path / "run"
    run.mkdir()
    (run / record).write_text("{}")
    code = main([*command, "--task", "bbc-news", "--max-steps", "1", "--output", str(run)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert f"holds another kind of run ({record})" in err and err.count("\n") == 1
    assert sorted(p.name for p in run.iterdir()) == [record]


def test_every_kind_of_run_names_its_record():
    assert set(RUN_RECORDS) == {"finetune", "compare", "compress-prompt", "convert-prefix"}
    assert len(set(RUN_RECORDS.values())) == len(RUN_RECORDS)
