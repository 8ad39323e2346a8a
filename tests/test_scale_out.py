"""Evaluating at cluster scale, on this machine: two torchrun "nodes" and a split cut into jobs.

- Two `torchrun` agents of one process each, joined by a c10d rendezvous on 127.0.0.1 (CPU, gloo),
  run the demo and the demo sweep under `--trainer.num_nodes 2 --trainer.devices 1`: results.json
  equals one process's to 1e-6, and each rank scores (and reads) only its own images.
- `--data.shard i/n` cuts the demo sweep into 3 jobs; tools/merge_runs.py joins them into the
  results and records of one run, and refuses parts of another evaluation, overlapping and
  missing shards in one line.

The split has 3 images (one per part); the reference runs are in-process and shared by the tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from conftest import load_script

from litelvlm.cli import main
from litelvlm.data.shard import parse_shard, shard_items
from litelvlm.engine.records import manifest_difference, read_manifest, read_records, write_manifest
from litelvlm.engine.runs import resume_command
from litelvlm.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SWEEP_DEMO = str(REPO / "configs" / "sweep_demo.yaml")
DEMO = str(REPO / "configs" / "demo.yaml")
NUM_IMAGES = 3
PARTS = 3
NUMBERS = ("ciou", "giou", "num_samples", "visual_tokens")


@pytest.fixture(scope="module")
def three_images(tmp_path_factory) -> Path:
    from litelvlm.data.synthetic import generate_synthetic_refcoco

    return generate_synthetic_refcoco(tmp_path_factory.mktemp("three_images"), num_images=NUM_IMAGES, seed=0)


def run(config: str, data_dir: Path, save_dir: Path, *extra: str) -> Path:
    """One in-process validate run; its run folder."""
    args = [
        "validate", "--config", config, "--data.data_dir", str(data_dir), "--data.batch_size", "1",
        "--data.max_sentences", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save_dir), *extra,
    ]  # fmt: skip
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]), contextlib.redirect_stdout(io.StringIO()):
        main(args)
    (results,) = save_dir.rglob("results.json")
    return results.parent


@pytest.fixture(scope="module")
def whole(three_images, tmp_path_factory) -> Path:
    return run(SWEEP_DEMO, three_images, tmp_path_factory.mktemp("whole"))


@pytest.fixture(scope="module")
def parts(three_images, tmp_path_factory) -> list[Path]:
    return [
        run(SWEEP_DEMO, three_images, tmp_path_factory.mktemp(f"part{index}"), "--data.shard", f"{index}/{PARTS}")
        for index in range(PARTS)
    ]


def record_tuples(run_dir: Path, configurations: list[str] | None = None) -> list[tuple]:
    rows = read_records(run_dir).to_pylist()
    return sorted(tuple(row.values()) for row in rows if configurations is None or row["configuration"] in configurations)


def merge(out: Path, runs: list[Path]) -> subprocess.CompletedProcess:
    """tools/merge_runs.py OUT RUN_DIR..., in-process: its exit code and output."""
    tool = load_script(REPO / "tools" / "merge_runs.py", "merge_runs_tool")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = tool.main([str(out), *map(str, runs)])
    return subprocess.CompletedProcess([], code, stdout.getvalue(), stderr.getvalue())


# ---------------------------------------------------------------------------------- two torchrun nodes
TORCHRUN_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_nodes(config: str, data_dir: Path, save_dir: Path) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents ("nodes") of one process each, in one process group killed on a hang."""
    rendezvous = [
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "litelvlm-test", "--max-restarts", "0",
    ]  # fmt: skip
    cli = [
        "-m", "litelvlm.cli", "validate", "--config", config, "--data.data_dir", str(data_dir),
        "--data.batch_size", "1", "--data.max_sentences", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", "cpu", "--trainer.num_nodes", "2", "--trainer.devices", "1",
        "--trainer.strategy", "ddp", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.callbacks+=rank_reads.CountDecodes",
    ]  # fmt: skip
    save_dir.mkdir(parents=True)
    (save_dir / "rank_reads.py").write_text(COUNT_DECODES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(save_dir), str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, *cli]
    agents = [
        subprocess.Popen(command, cwd=save_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for _ in range(2)
    ]  # each agent and its worker in a session of their own, killed as a group on a hang
    try:
        outputs = [agent.communicate(timeout=TORCHRUN_TIMEOUT_S) for agent in agents]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"two torchrun agents hung for {TORCHRUN_TIMEOUT_S} s") from None
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.communicate()
    return [subprocess.CompletedProcess(command, agent.returncode, out, err) for agent, (out, err) in zip(agents, outputs)]


# Each rank counts the images it decodes: every image it scores, and no other.
COUNT_DECODES = """
import json
import lightning as L
import litelvlm.data.refcoco_parquet as parquet

decoded = []
_decode = parquet.decode_rgb
parquet.decode_rgb = lambda file: decoded.append(1) or _decode(file)


class CountDecodes(L.Callback):
    def __init__(self):
        self.scored = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.scored += [int(i) for i in batch.sample_ids]

    def on_validation_end(self, trainer, pl_module):
        record = {"rank": trainer.global_rank, "node": trainer.node_rank, "world": trainer.world_size,
                  "environment": type(trainer.strategy.cluster_environment).__name__,
                  "scored": self.scored, "decoded": len(decoded)}
        with open(f"rank{trainer.global_rank}.json", "w") as handle:
            json.dump(record, handle)
"""


def assert_two_nodes_equal_one_process(save_dir: Path, done: list[subprocess.CompletedProcess], reference: Path) -> None:
    for agent in done:
        assert agent.returncode == 0, agent.stderr[-4000:]
    ranks = [json.loads((save_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["node"], r["world"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert {r["environment"] for r in ranks} == {"TorchElasticEnvironment"}  # Lightning read torchrun's variables
    assert sorted(ranks[0]["scored"] + ranks[1]["scored"]) == list(range(NUM_IMAGES))  # each image once
    assert [r["decoded"] for r in ranks] == [len(r["scored"]) for r in ranks]  # read only what it scores
    (results,) = [path for path in save_dir.rglob("results.json")]
    got, want = json.loads(results.read_text()), json.loads((reference / "results.json").read_text())
    got = got if isinstance(got, list) else [got]
    names = [row["configuration"] for row in got]
    want = [row for row in want if row["configuration"] in names]  # the demo's one is among the sweep's
    assert names == [row["configuration"] for row in want]
    for row, expected in zip(got, want):
        for key in NUMBERS:
            assert row[key] == pytest.approx(expected[key], abs=1e-6), (expected["configuration"], key)
    assert record_tuples(results.parent) == record_tuples(reference, names)


def test_two_torchrun_nodes_of_one_process_give_the_demo_numbers_of_one_process(three_images, whole, tmp_path):
    # The one-process reference is the sweep's litelvlm@192, which equals the demo's own run (tests/test_sweep.py).
    done = run_two_nodes(DEMO, three_images, tmp_path / "two_nodes")
    assert_two_nodes_equal_one_process(tmp_path / "two_nodes", done, whole)


def test_two_torchrun_nodes_of_one_process_give_the_sweep_numbers_of_one_process(three_images, whole, tmp_path):
    done = run_two_nodes(SWEEP_DEMO, three_images, tmp_path / "two_nodes")
    assert_two_nodes_equal_one_process(tmp_path / "two_nodes", done, whole)


# ---------------------------------------------------------------------------------- the parts
def test_each_part_scores_its_own_image_and_together_they_score_the_split(whole, parts):
    seen = [sorted(set(read_records(part)["sample_id"].to_pylist())) for part in parts]
    assert seen == [[0], [1], [2]]  # part i of 3 on 3 images: image i, under its id in the whole split
    assert [read_manifest(part)["data"]["shard"] for part in parts] == ["0/3", "1/3", "2/3"]
    assert "shard" not in read_manifest(whole)["data"]


def test_three_merged_parts_equal_one_run_of_the_whole_split(whole, parts, tmp_path):
    done = merge(tmp_path / "merged", parts)
    assert done.returncode == 0, done.stderr
    merged, reference = (json.loads((folder / "results.json").read_text()) for folder in (tmp_path / "merged", whole))
    assert len(reference) == 28  # the demo sweep: none, pdrop + 13 strategies x 2 budgets
    assert [row["configuration"] for row in merged] == [row["configuration"] for row in reference]
    for got, want in zip(merged, reference):
        for key in NUMBERS:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (want["configuration"], key)
        assert {k: v for k, v in got.items() if k not in NUMBERS} == {k: v for k, v in want.items() if k not in NUMBERS}
    assert record_tuples(tmp_path / "merged") == record_tuples(whole)
    assert "shard" not in read_manifest(tmp_path / "merged")["data"]
    assert "merged 3 parts" in done.stdout


# ---------------------------------------------------------------------------------- refusals
def refused(out: Path, runs: list[Path]) -> str:
    done = merge(out, runs)
    assert done.returncode == 2, done.stdout
    (line,) = done.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("merge_runs: error:")
    assert not (out / "results.json").exists() and not (out / "records").exists()
    return line


def test_a_missing_part_is_refused(parts, tmp_path):
    assert "missing shards: 1/3" in refused(tmp_path / "out", [parts[0], parts[2]])


def test_a_part_given_twice_is_refused_as_overlapping(parts, tmp_path):
    assert "overlapping shards: 0/3" in refused(tmp_path / "out", [parts[0], parts[0], parts[1], parts[2]])


def test_the_whole_split_with_its_parts_is_refused_as_overlapping(whole, parts, tmp_path):
    assert "overlaps every other part" in refused(tmp_path / "out", [whole, *parts])


def test_parts_of_two_splittings_are_refused_as_overlapping(parts, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(parts[1], other)
    manifest = read_manifest(other)
    write_manifest(other, {**manifest, "data": {**manifest["data"], "shard": "1/2"}})
    assert "parts of different splittings" in refused(tmp_path / "out", [parts[0], other, parts[2]])


def test_a_part_of_another_configuration_is_refused(three_images, parts, tmp_path):
    other = run(DEMO, three_images, tmp_path / "demo", "--data.shard", "2/3")  # the demo's one pruner, not the sweep
    line = refused(tmp_path / "out", [parts[0], parts[1], other])
    assert "parts of different evaluations: the configurations differ" in line


# ---------------------------------------------------------------------------------- the parts' arithmetic
def test_shard_parses_i_of_n_zero_based_and_refuses_anything_else():
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) is None
    for bad in ("3/3", "1", "-1/3", "a/b", "1/0"):
        with pytest.raises(DataError, match="data.shard"):
            parse_shard(bad)


class _Indexed:
    """An indexed split: item -> (image record, sentence positions), as `ReferringRecordDataset.items`."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_parts_are_disjoint_cover_every_item_and_keep_an_image_whole(count):
    # 7 images; per-sentence items, image r has r % 3 + 1 sentences
    items = [(image, [position]) for image in range(7) for position in range(image % 3 + 1)]
    split = _Indexed(items)
    parts = [shard_items(split, index, count, "val") for index in range(count)]
    assert sorted(item for part in parts for item in part) == list(range(len(items)))
    images = [{items[item][0] for item in part} for part in parts]
    assert all(not a & b for i, a in enumerate(images) for b in images[i + 1 :])
    assert max(map(len, images)) - min(map(len, images)) <= 1  # balanced to one image
    assert [min(part) for part in images] == sorted(min(part) for part in images)  # contiguous, in order


def test_more_parts_than_images_is_a_clear_error():
    with pytest.raises(DataError, match="only 2 images, fewer than 3 parts"):
        shard_items(_Indexed([(0, [0]), (1, [0])]), 0, 3, "val")


def test_a_part_resumed_as_another_part_is_refused(parts):
    manifest = read_manifest(parts[0])
    other = {**manifest, "data": {**manifest["data"], "shard": "1/3"}}
    assert manifest_difference(manifest, other) == "the data differs (shard '0/3' there, '1/3' here)"
    assert manifest_difference(manifest, manifest) is None


def test_the_resume_command_repeats_the_arguments_with_one_resume():
    args = ["validate", "--config", "c.yaml", "--resume", "runs/old", "--data.shard", "1/3", "--resume=runs/x"]
    assert resume_command(args, "runs/a b/version_0") == (
        "python -m litelvlm.cli validate --config c.yaml --data.shard 1/3 --resume 'runs/a b/version_0'"
    )


def test_a_per_part_field_the_merge_cannot_recompute_is_left_out_not_copied(capsys):
    from litelvlm.engine.merge import _merged_rows

    def row(extra: int, skipped: list) -> dict:
        return {"split": "val", "configuration": "none", "ciou": 0.0, "giou": 0.0, "num_samples": 1,
                "visual_tokens": 576.0, "checkpoint": "tiny-glamm", "per_part_count": extra, "skipped": skipped}  # fmt: skip

    merged_numbers = {("val", "none"): {"ciou": 0.5, "giou": 0.25, "num_masks": 4, "visual_tokens": 576.0}}
    (merged,) = _merged_rows([[row(1, [{"index": 3}])], [row(2, [])]], merged_numbers)
    assert merged == {"split": "val", "configuration": "none", "ciou": 0.5, "giou": 0.25, "num_samples": 4,
                      "visual_tokens": 576.0, "checkpoint": "tiny-glamm", "skipped": [{"index": 3}]}  # fmt: skip
    assert "left out (they differ between the parts and are not recomputed): per_part_count" in capsys.readouterr().err
