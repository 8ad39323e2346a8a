"""Per-sample records survive a hard kill, and a resumed run ends exactly where an uninterrupted one does.

A run is killed with SIGKILL (no exception handler, no teardown) after some batches; resuming it
evaluates only the samples without records and gives bit-identical metrics and the same records,
none duplicated or lost, on any number of processes: killed on 1 and resumed on 2, killed on 2 and
resumed on 1. A SIGTERM stops a run cleanly with a resume command. Records of another evaluation in
the run folder are refused with one clear line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pytest

from process_helpers import run_in_session

from litelvlm.cli import main
from litelvlm.engine.records import (
    PartWriter,
    RecordsError,
    SCHEMA,
    metrics_from_records,
    part_files,
    read_records,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
NUM_IMAGES = 5  # odd: under 2 processes, rank 0 gets 3 images and rank 1 gets 2
PRUNERS = "[{class_path: none}, {class_path: fastv, init_args: {num_tokens: 64}}, {class_path: litelvlm, init_args: {num_tokens: 32}}]"
CONFIGURATIONS = ["none", "fastv@64", "litelvlm@32"]
TIMEOUT_S = 300
KILL_AFTER = '''
import os, signal
import lightning as L


class KillAfter(L.Callback):
    """SIGKILL the whole process group (every rank) once this process has finished `batches` batches."""

    def __init__(self, batches: int = 2) -> None:
        self.batches, self.seen = batches, 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen += 1
        if self.seen >= self.batches:
            os.killpg(os.getpgid(0), signal.SIGKILL)
'''


@pytest.fixture(scope="module")
def small_split(tmp_path_factory) -> Path:
    from litelvlm.data.synthetic import generate_synthetic_refcoco

    return generate_synthetic_refcoco(tmp_path_factory.mktemp("small_split"), num_images=NUM_IMAGES, seed=0)


def evaluation_args(data_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    """The evaluation every test here runs: a 3-configuration sweep, one image per batch, version fixed."""
    return [
        "validate", "--config", DEMO, "--model.pruner", "null", "--model.pruners", PRUNERS,
        "--data.data_dir", str(data_dir), "--data.batch_size", "1", "--data.max_sentences", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.logger.init_args.version", "run", *extra,
    ]  # fmt: skip


def run_in_process(args: list[str]) -> None:
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]), contextlib.redirect_stdout(io.StringIO()):
        main(args)


def run_killed(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process group, with a callback that SIGKILLs the group after 2 batches."""
    (tmp_path / "kill_after.py").write_text(KILL_AFTER)
    env = dict(os.environ)  # keeps LITELVLM_CACHE, the private cache conftest set
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "litelvlm.cli", *args[:1], "--trainer.callbacks+=kill_after.KillAfter", *args[1:]]
    return run_group(command, tmp_path, env)


def run_group(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_in_session(command, cwd, TIMEOUT_S, env)


def results_of(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())


def scored(run_dir: Path) -> list[tuple]:
    """Every record, as comparable tuples (read_records refuses a mask recorded twice)."""
    keys = ("split", "sample_id", "image_id", "sentence_id", "mask_index", "configuration", "intersection", "union", "retained_tokens")
    return sorted(tuple(row[key] for key in keys) for row in read_records(run_dir).to_pylist())


def samples_by_attempt(run_dir: Path) -> dict[int, set[int]]:
    found: dict[int, set[int]] = {}
    for path in part_files(run_dir / "records"):
        attempt = int(re.match(r"part-a(\d+)", path.name).group(1))
        found.setdefault(attempt, set()).update(pa.parquet.read_table(path)["sample_id"].to_pylist())
    return found


@pytest.fixture(scope="module")
def uninterrupted(small_split, tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("uninterrupted")
    run_in_process(evaluation_args(small_split, save_dir))
    return save_dir / "demo" / "run"


def assert_same_as_uninterrupted(run_dir: Path, uninterrupted: Path) -> None:
    resumed, reference = results_of(run_dir), results_of(uninterrupted)
    assert [row["configuration"] for row in resumed] == CONFIGURATIONS
    for got, want in zip(resumed, reference):
        assert (got["ciou"], got["giou"], got["num_samples"]) == (want["ciou"], want["giou"], want["num_samples"])
    assert scored(run_dir) == scored(uninterrupted)  # no record lost, none duplicated, same values
    assert {row["configuration"]: row["ciou"] for row in metrics_from_records(run_dir)} == {
        row["configuration"]: row["ciou"] for row in resumed
    }


# ----------------------------------------------------------------------------------- resume
DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")


def test_a_run_killed_on_one_process_resumes_on_two_to_the_uninterrupted_numbers(small_split, uninterrupted, tmp_path):
    args = evaluation_args(small_split, tmp_path / "logs")
    run_dir = tmp_path / "logs" / "demo" / "run"
    killed = run_killed(args, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert not (run_dir / "results.json").exists()
    first = samples_by_attempt(run_dir)
    assert list(first) == [0] and 0 < len(first[0]) < NUM_IMAGES  # some batches recorded, not all

    # The records decide what is missing, whatever the rank layout: 2 processes share the rest.
    resume = [sys.executable, "-m", "litelvlm.cli", *evaluation_args(small_split, tmp_path / "elsewhere", *DDP)]
    done = run_group([*resume, "--resume", str(run_dir)], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    attempts = samples_by_attempt(run_dir)
    assert attempts[1] == set(range(NUM_IMAGES)) - attempts[0]  # only what was missing ran
    ranks = {int(re.search(r"-r(\d+)-", path.name).group(1)) for path in part_files(run_dir / "records") if "-a001-" in path.name}
    assert ranks == {0, 1}  # both processes of the resumed run scored some of it
    assert not (tmp_path / "elsewhere").exists()  # --resume wins over the logger's save_dir
    assert_same_as_uninterrupted(run_dir, uninterrupted)


def test_a_run_killed_on_two_processes_resumes_on_one_to_the_uninterrupted_numbers(small_split, uninterrupted, tmp_path):
    args = evaluation_args(small_split, tmp_path / "logs", *DDP)
    run_dir = tmp_path / "logs" / "demo" / "run"
    killed = run_killed(args, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    first = samples_by_attempt(run_dir)
    assert first and 0 < len(first[0]) < NUM_IMAGES

    run_in_process(evaluation_args(small_split, tmp_path / "elsewhere", "--resume", str(run_dir)))  # one process
    attempts = samples_by_attempt(run_dir)
    assert attempts[1] == set(range(NUM_IMAGES)) - attempts[0]
    assert_same_as_uninterrupted(run_dir, uninterrupted)


TERM_GROUP = """
import os, signal
import lightning as L


class TermGroup(L.Callback):
    # SIGTERM every process of the run at once, as srun or scancel signal every task, after rank 0's first batch.
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.global_rank == 0 and batch_idx == 0:
            os.killpg(os.getpgid(0), signal.SIGTERM)
"""


def test_sigterm_on_two_processes_stops_cleanly_and_prints_the_command_that_resumes(small_split, uninterrupted, tmp_path):
    """What a scheduler sends before its kill: every process stops at its batch end with its records
    written, status.json says `interrupted`, the exit code is not 0, and the printed command (here on
    one process) finishes the run."""
    (tmp_path / "term_group.py").write_text(TERM_GROUP)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    args = evaluation_args(small_split, tmp_path / "logs", *DDP)
    run_dir = tmp_path / "logs" / "demo" / "run"
    command = [sys.executable, "-m", "litelvlm.cli", args[0], "--trainer.callbacks+=term_group.TermGroup", *args[1:]]
    done = run_group(command, tmp_path, env)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-4000:]
    assert "Traceback" not in done.stderr and "Connection closed" not in done.stderr, done.stderr[-4000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM"
    first = samples_by_attempt(run_dir)
    assert list(first) == [0] and 0 in first[0] and 2 not in first[0]  # rank 0 stopped after its first image (0 of 0, 2, 4)
    assert not (run_dir / "results.json").exists()
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("litelvlm: resume with: ")]
    resume = shlex.split(line.removeprefix("litelvlm: resume with: "))
    assert resume[:3] == ["python", "-m", "litelvlm.cli"] and resume[-2:] == ["--resume", str(run_dir)]
    assert status["resume"] == shlex.join(resume)

    one_process = [arg for arg in resume[3:] if arg != "--trainer.callbacks+=term_group.TermGroup"]
    one_process[one_process.index("--trainer.devices") + 1] = "1"
    one_process[one_process.index("--trainer.strategy") + 1] = "auto"
    run_in_process(one_process)
    assert samples_by_attempt(run_dir)[1] == set(range(NUM_IMAGES)) - first[0]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
    assert_same_as_uninterrupted(run_dir, uninterrupted)


def test_a_complete_run_run_again_evaluates_nothing_and_reports_the_same(small_split, uninterrupted):
    before, records_before = results_of(uninterrupted), scored(uninterrupted)
    run_in_process(evaluation_args(small_split, uninterrupted.parent.parent))  # the same command, same folder
    assert list(samples_by_attempt(uninterrupted)) == [0]  # the second attempt evaluated and wrote nothing
    assert results_of(uninterrupted) == before
    assert scored(uninterrupted) == records_before


# ----------------------------------------------------------------------------------- refusals
def _refused(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(args)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert "Traceback" not in stderr
    return stderr


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (("--model.pruners", "[{class_path: none}, {class_path: fastv, init_args: {num_tokens: 32}}]"), "configurations differ"),
        (("--model.pruners", PRUNERS.replace("num_tokens: 64}", "num_tokens: 64, mode: mask}")), "same names with different knobs"),
        (("--data.max_sentences", "1"), "data differs"),
        (("--model.seed", "1"), "model differs in seed"),
    ],
    ids=["other-configurations", "other-knobs", "other-data", "other-model"],
)
def test_records_of_another_evaluation_are_refused_in_one_line(small_split, uninterrupted, tmp_path, capsys, change, phrase):
    save_dir = uninterrupted.parent.parent
    before = scored(uninterrupted)
    stderr = _refused(evaluation_args(small_split, save_dir, *change), capsys)
    (line,) = [line for line in stderr.splitlines() if phrase in line]
    assert line.startswith("litelvlm: error: run folder") and "holds records of a different evaluation" in line
    assert scored(uninterrupted) == before  # nothing mixed in


def test_resume_of_a_folder_without_records_is_a_clear_error(small_split, tmp_path, capsys):
    stderr = _refused(evaluation_args(small_split, tmp_path, "--resume", str(tmp_path / "nothing")), capsys)
    assert "no run to resume there" in stderr


# ----------------------------------------------------------------------------------- crash safety
def _table(sample_id: int, configuration: str = "none") -> pa.Table:
    row = {"split": "val", "sample_id": sample_id, "image_id": "i", "sentence_id": "s", "mask_index": 0,
           "configuration": configuration, "intersection": 1, "union": 2, "retained_tokens": 576}  # fmt: skip
    return pa.Table.from_pylist([row], schema=SCHEMA)


def test_a_half_written_part_file_is_never_read_as_records(tmp_path):
    folder = tmp_path / "records"
    writer = PartWriter(folder, attempt=0, rank=1)
    writer.write(_table(0))
    (folder / ".part-a000-r001-b000001.parquet.tmp").write_bytes(b"PAR1 half a file")  # what a kill mid-write leaves
    assert [path.name for path in part_files(folder)] == ["part-a000-r001-b000000.parquet"]
    assert read_records(tmp_path).to_pylist() == _table(0).to_pylist()


def test_a_mask_recorded_twice_makes_the_records_untrustworthy(tmp_path):
    PartWriter(tmp_path / "records", attempt=0, rank=0).write(_table(3))
    PartWriter(tmp_path / "records", attempt=1, rank=0).write(_table(3))
    with pytest.raises(RecordsError, match="more than once"):
        read_records(tmp_path)
