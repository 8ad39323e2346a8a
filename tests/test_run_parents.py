"""A run named by its parent folder (`runs/sweep_demo` for `runs/sweep_demo/version_N`): compare and
`model.finetuned` take the latest complete run that has what they read, `--resume` the latest run
with records, killed or not; a run folder given as such is used as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_compare import HANDMADE, write_run

from litelvlm.cli import _expand_resume_flag
from litelvlm.engine.finetuned import MANIFEST_FILE, WEIGHTS_FILE, resolve_export
from litelvlm.engine.records import has_records
from litelvlm.engine.runs import COMPLETE, FAILED, RUNNING, read_status, resolve_run, write_status
from litelvlm.errors import LitelvlmError


def sweep_parent(parent: Path) -> Path:
    """version_2 complete with records, version_9 failed, version_10 killed (running) with records,
    version_11 complete without records (an encoders-only study, say). By number, not by name: 10 > 9."""
    for version, status, records in [(2, COMPLETE, True), (9, FAILED, True), (10, RUNNING, True), (11, COMPLETE, False)]:
        run = parent / f"version_{version}"
        if records:
            write_run(run, HANDMADE)
        write_status(run, status, stage="validate")
    (parent / "version_x").mkdir()  # not a logger's version folder: ignored
    return parent


def test_the_latest_complete_run_with_records_is_picked(tmp_path, capsys):
    parent = sweep_parent(tmp_path / "sweep_demo")
    assert resolve_run(parent, has_records, "records") == parent / "version_2"
    assert f"-> {parent / 'version_2'}" in capsys.readouterr().err  # says which one it took
    assert resolve_run(parent, has_records, "records", complete=False) == parent / "version_10"
    assert resolve_run(parent, lambda run: True, "anything") == parent / "version_11"


def test_a_run_folder_is_taken_as_given(tmp_path):
    parent = sweep_parent(tmp_path / "sweep_demo")
    assert resolve_run(parent / "version_9", has_records, "records") == parent / "version_9"


def test_a_parent_without_a_fitting_run_says_what_it_found(tmp_path):
    parent = tmp_path / "sweep_demo"
    write_run(parent / "version_0", HANDMADE)  # killed: no status file
    write_status(parent / "version_1", FAILED, stage="validate", error="DataError: bad")
    with pytest.raises(LitelvlmError, match=r"no complete run with records under it \(version_0 no status, version_1 failed\)"):
        resolve_run(parent, has_records, "records")


def test_status_is_written_and_read_back(tmp_path):
    write_status(tmp_path, FAILED, stage="fit", error="ValueError: x")
    assert read_status(tmp_path) == FAILED
    assert read_status(tmp_path / "elsewhere") is None


def test_compare_reads_the_latest_complete_run_of_a_parent(compare_tool, tmp_path, capsys):
    parent = sweep_parent(tmp_path / "sweep_demo")
    assert compare_tool.main([str(parent), "--baseline", "none", "--bootstrap", "50"]) == 0
    assert (parent / "version_2" / "compare.md").is_file()  # written into the run it compared
    assert not (parent / "compare.md").exists()


def test_resume_takes_the_latest_run_with_records_of_a_parent(tmp_path):
    parent = sweep_parent(tmp_path / "sweep_demo")
    args = _expand_resume_flag(["validate", "--resume", str(parent)])
    logger = "--trainer.logger.init_args."
    assert args[-6:] == [f"{logger}save_dir", str(parent), f"{logger}name", "", f"{logger}version", "10"]


def test_finetuned_takes_the_latest_complete_fit_of_a_parent(tmp_path):
    parent = tmp_path / "finetune_demo"
    for version, status in [(0, COMPLETE), (1, COMPLETE), (2, FAILED)]:
        run = parent / f"version_{version}"
        run.mkdir(parents=True)
        (run / WEIGHTS_FILE).write_bytes(b"weights")
        (run / MANIFEST_FILE).write_text("{}")
        write_status(run, status, stage="fit")
    (parent / "version_3").mkdir()
    write_status(parent / "version_3", COMPLETE, stage="validate")  # complete, but no export
    assert resolve_export(parent) == parent / "version_1" / WEIGHTS_FILE
    assert resolve_export(parent / "version_2") == parent / "version_2" / WEIGHTS_FILE  # as given
