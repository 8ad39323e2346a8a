"""A user's first hour with the CLI: bad files named in one line, run folders only for runs that
start (and a status in each), an honest resume report, and a console without library chatter."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path
from unittest import mock

import pytest

from process_helpers import run_in_session
from test_cli import DEMO, QUICK, cli_main
from test_data_original import coco_name, write_original_layout

from litelvlm.data.refcoco_parquet import load_refcoco_rows
from litelvlm.errors import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def truncated_parquet(tmp_path_factory) -> Path:
    """A parquet folder whose val file lost its end (an interrupted download)."""
    from litelvlm.data.synthetic import generate_synthetic_refcoco

    root = generate_synthetic_refcoco(tmp_path_factory.mktemp("truncated"), num_images=3, seed=0)
    (val,) = sorted(Path(root).glob("data/val-*.parquet"))
    os.truncate(val, val.stat().st_size // 2)
    return Path(root)


def failing_run(save_dir: Path, capsys, *args: str, config: str = DEMO) -> list[str]:
    """Run the CLI on bad input: exit code 2, no traceback; the stderr lines."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["validate", "--config", config, *args, *QUICK, "--trainer.logger.init_args.save_dir", str(save_dir)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()


def run_folders(save_dir: Path) -> list[Path]:
    return sorted(save_dir.rglob("version_*"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*")}


# ------------------------------------------------------------------ item 2: a truncated parquet file
def test_a_truncated_parquet_file_is_named_by_the_loader(truncated_parquet):
    with pytest.raises(DataError, match=r"val-00000-of-00001\.parquet is not a readable parquet file"):
        load_refcoco_rows(truncated_parquet, "val")


def test_a_truncated_parquet_file_is_one_line_and_leaves_no_run_folder(truncated_parquet, tmp_path, capsys):
    lines = failing_run(tmp_path, capsys, "--data.data_dir", str(truncated_parquet))
    errors = [line for line in lines if line.startswith("litelvlm: error:")]
    assert len(errors) == 1 and "val-00000-of-00001.parquet" in errors[0] and "parquet" in errors[0], lines
    assert run_folders(tmp_path) == []


# ---------------------------------------------------------------------- item 3: config file errors
def test_a_yaml_syntax_error_names_the_config_file_and_its_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  pruner:\n    class_path: [litelvlm\n    init_args: {num_tokens: 64}\n")
    lines = failing_run(tmp_path, capsys, config=str(config))
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"litelvlm: error: config file {config}, line ") and "YAML syntax error" in lines[0]
    assert "line 3" in lines[0]  # the unclosed '[' opens on line 3
    assert "<unicode string>" not in lines[0]


def test_a_missing_config_file_is_the_only_line(tmp_path, capsys):
    missing = tmp_path / "no-such-config.yaml"
    lines = failing_run(tmp_path, capsys, config=str(missing))
    assert lines == [f"litelvlm: error: config file {missing} does not exist"]
    assert run_folders(tmp_path) == []


# ------------------------------------------------------------------------ item 6: run folders
@pytest.mark.parametrize("data", ["missing", "empty"])
def test_bad_data_folders_leave_no_run_folder(tmp_path, capsys, data):
    folder = tmp_path / "data"
    if data == "empty":
        folder.mkdir()
    lines = failing_run(tmp_path / "logs", capsys, "--data.data_dir", str(folder))
    assert any(str(folder) in line for line in lines if line.startswith("litelvlm: error:")), lines
    assert run_folders(tmp_path / "logs") == []


def test_a_run_that_fails_after_it_started_says_so_in_its_folder(tmp_path, capsys):
    root = write_original_layout(tmp_path / "data")
    (root / "coco_2014" / "train2014" / coco_name(2)).write_bytes(b"not a jpeg")  # the first val image
    failing_run(tmp_path / "logs", capsys, "--data.data_dir", str(root), "--data.dataset", "refcoco")
    (run,) = run_folders(tmp_path / "logs")
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["stage"] == "validate"
    assert coco_name(2) in status["error"] and "\n" not in status["error"]
    assert not (run / "results.json").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A demo run that scored its first batch (2 samples) and ended well."""
    save_dir = tmp_path_factory.mktemp("finished")
    with contextlib.redirect_stdout(io.StringIO()):
        cli_main(["validate", "--config", DEMO, *QUICK, "--trainer.logger.init_args.save_dir", str(save_dir)])
    (run,) = run_folders(save_dir)
    return run


def test_a_run_that_ends_well_is_complete(finished_run):
    assert json.loads((finished_run / "status.json").read_text()) == {"status": "complete", "stage": "validate"}


def test_a_refused_resume_writes_nothing_into_the_refused_run(finished_run, tmp_path, capsys):
    before = snapshot(finished_run)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["validate", "--config", DEMO, *QUICK, "--model.pruner", "fastv", "--resume", str(finished_run)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "different evaluation" in stderr, stderr
    assert snapshot(finished_run) == before


# ------------------------------------------------------------------------ item 8: what resume reused
def test_resume_says_how_many_samples_it_reused_and_how_many_it_ran(tmp_path, capsys):
    quick = ["--data.max_sentences", "1", "--trainer.enable_progress_bar", "false"]
    save = ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli_main(["validate", "--config", DEMO, *quick, "--trainer.limit_val_batches", "1", *save])
    capsys.readouterr()
    (run,) = run_folders(tmp_path)
    parent = run.parent  # the run's parent stands for its latest run with records
    cli_main(["validate", "--config", DEMO, *quick, "--trainer.limit_val_batches", "3", "--resume", str(parent)])
    out = capsys.readouterr().out
    # demo.yaml: 2 samples per batch; batch 1 was recorded, batches 2 and 3 are new
    assert f"resumed {run}: 2 samples from its earlier records, 4 evaluated now" in out, out
    results = json.loads((run / "results.json").read_text())
    assert results["num_samples"] == 6  # one sentence per sample: the whole 3 batches reported


def test_validate_help_lists_resume(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["validate", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "--resume RESUME" in out and "RUN_DIR" in out


def test_resume_in_a_config_file_is_refused_not_ignored(tmp_path, capsys):
    config = tmp_path / "resume.yaml"
    config.write_text(f"resume: {tmp_path}\n")
    lines = failing_run(tmp_path / "logs", capsys, "--config", str(config))
    assert any("--resume RUN_DIR" in line for line in lines), lines


# ----------------------------------------------------------------------- items 9 and 10: the console
# Lightning's metric dump ("Validate metric" box) repeats the results table, 4 rows per configuration.
NOISE = ("💡 Tip", "LeafSpec", "Generating train split", "sync_dist", "Validate metric")


def test_a_demo_run_prints_no_library_chatter(tmp_path):
    command = [
        sys.executable, "-m", "litelvlm.cli", "validate", "--config", DEMO, *QUICK,
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")}  # so `datasets` indexes the parquet again
    done = run_in_session(command, REPO, 240, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    console = done.stdout + done.stderr
    assert "results written to" in console
    assert not [noise for noise in NOISE if noise in console], console
    # The results table and the random-weights note are what the run ends on.
    assert re.search(r"^litelvlm\s+192\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+$", done.stdout, re.MULTILINE), done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("results written to")


def test_the_progress_bar_shows_no_version_number(tmp_path):
    from litelvlm.cli import main

    with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        cli = main(["--config", DEMO, "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    bar = cli.trainer.progress_bar_callback
    assert bar is not None
    trainer = cli.trainer
    trainer._logger_connector._progress_bar_metrics = {"train/loss": 0.5}  # what a training step shows
    assert bar.get_metrics(trainer, cli.model) == {"train/loss": 0.5}
