"""End to end through the CLI: `python -m litelvlm.cli validate|test --config configs/demo.yaml ...`.

Runs go in-process through `litelvlm.cli.main([...])` (the function `python -m litelvlm.cli` calls),
except the externally defined pruner, which needs a fresh interpreter with its folder on PYTHONPATH.
Every run logs into tmp_path; batches are limited so the file stays fast on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from litelvlm.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
VISPRUNER_PRESET = str(REPO / "configs" / "pruners" / "vispruner.yaml")
NUM_PATCHES = 576  # the tiny preset keeps the 24 x 24 grid of CLIP ViT-L/14 at 336 px


# --------------------------------------------------------------------------------------- helpers
def count_masks(data_dir: Path, split: str, max_sentences: int | None, num_images: int | None = None) -> int:
    """Masks an evaluation of the first `num_images` images scores, counted from the parquet rows.

    One mask per evaluated sentence; an image pools the sentences of all its refs (rows), and at most
    `max_sentences` of them are drawn. Rows belong to the image named by their file name minus suffix.
    """
    files = sorted(Path(data_dir).glob(f"data/{split}-*.parquet"))
    assert files, f"no {split} parquet files in {data_dir}"
    per_image: dict[str, int] = {}
    for file in files:
        table = pq.read_table(file, columns=["file_name", "answer"]).to_pydict()
        for file_name, answer in zip(table["file_name"], table["answer"]):
            image = Path(file_name).stem.rsplit("_", 1)[0]
            per_image[image] = per_image.get(image, 0) + len(answer)
    counts = [n if max_sentences is None else min(n, max_sentences) for n in per_image.values() if n > 0]
    return sum(counts if num_images is None else counts[:num_images])


def demo_data_dir() -> Path:
    from litelvlm.data.synthetic import ensure_demo_data

    return Path(ensure_demo_data())  # under $LITELVLM_CACHE, the private folder conftest sets


def cli_main(args: list[str]):
    """`litelvlm.cli.main(args)` as `python -m litelvlm.cli ARGS` runs it (pytest's own argv hidden)."""
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        return main(args)


def run_cli(save_dir: Path, *args: str, subcommand: str = "validate") -> tuple[dict, Path]:
    """Run the CLI in-process; return results.json and the run folder (the one that holds it)."""
    cli_main([subcommand, "--config", DEMO, *args, "--trainer.logger.init_args.save_dir", str(save_dir)])
    found = sorted(save_dir.rglob("results.json"))
    assert len(found) == 1, f"expected one results.json under {save_dir}, found {found}"
    return json.loads(found[0].read_text()), found[0].parent


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = sorted(run_dir.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {run_dir}"
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_metric(value) -> None:
    assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, value


QUICK = ("--trainer.limit_val_batches", "1", "--data.max_sentences", "1", "--trainer.enable_progress_bar", "false")


# ------------------------------------------------------------------------------------ the demo
DEMO_BATCHES = 3  # of 2 images each (demo.yaml: batch_size 2, max_sentences 3)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("demo_logs")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results, run_dir = run_cli(save_dir, "--trainer.limit_val_batches", str(DEMO_BATCHES))
    return results, run_dir, stdout.getvalue()


def test_demo_writes_results_json(demo_run):
    results, run_dir, _ = demo_run
    assert results["pruner"] == "litelvlm"
    assert results["num_tokens"] == 192
    assert_metric(results["ciou"])
    assert_metric(results["giou"])
    expected = count_masks(demo_data_dir(), "val", max_sentences=3, num_images=2 * DEMO_BATCHES)
    assert results["num_samples"] == expected
    assert results["random_weights"] is True
    # Beside the TensorBoard logs of the same run, not somewhere in the repository.
    assert sorted(run_dir.glob("events.out.tfevents.*"))


def test_demo_prints_the_table_and_the_random_weights_note(demo_run):
    results, _, stdout = demo_run
    header = re.search(r"^pruner\s+budget\s+cIoU\s+gIoU\s+samples\s*$", stdout, re.MULTILINE)
    assert header, stdout
    row = rf"^litelvlm\s+192\s+{100 * results['ciou']:.2f}\s+{100 * results['giou']:.2f}\s+{results['num_samples']}\s*$"
    assert re.search(row, stdout, re.MULTILINE), stdout
    assert "random weights" in stdout
    assert "measures nothing" in stdout


def test_demo_logs_metrics_to_tensorboard(demo_run):
    results, run_dir, _ = demo_run
    logged = scalars(run_dir)
    for tag in ("val/ciou", "val/giou", "val/visual_tokens"):
        assert tag in logged, sorted(logged)
        assert len(logged[tag]) == 1, (tag, logged[tag])  # one value per evaluation epoch
    assert logged["val/ciou"][0] == pytest.approx(results["ciou"], abs=1e-6)
    assert logged["val/giou"][0] == pytest.approx(results["giou"], abs=1e-6)
    assert logged["val/visual_tokens"][0] == 192.0


def test_demo_logs_pruner_and_budget_as_tensorboard_hparams(demo_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run_dir, _ = demo_run
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["pruner"].string_value == "litelvlm"
    assert hparams["num_tokens"].number_value == 192


# ------------------------------------------------------------------ switching strategy and budget
@pytest.mark.parametrize(
    ("flags", "pruner", "num_tokens"),
    [
        (("--model.pruner", "fastv", "--model.pruner.num_tokens", "64"), "fastv", 64),
        (("--model.pruner=random", "--model.pruner.num_tokens=50"), "random", 50),
    ],
    ids=["fastv-64", "random-50-equals-form"],
)
def test_pruner_and_budget_by_flag(tmp_path, flags, pruner, num_tokens):
    results, run_dir = run_cli(tmp_path, *flags, *QUICK)
    assert (results["pruner"], results["num_tokens"]) == (pruner, num_tokens)
    assert results["num_samples"] == 2  # 1 batch of 2 images, 1 sentence each
    assert_metric(results["ciou"])
    assert scalars(run_dir)["val/visual_tokens"] == [float(num_tokens)]


def test_vispruner_preset_by_class_path(tmp_path):
    """configs/pruners/vispruner.yaml names `litelvlm.pruners.VisPruner`; stacked on the demo it wins."""
    results, run_dir = run_cli(tmp_path, "--config", VISPRUNER_PRESET, *QUICK)
    assert (results["pruner"], results["num_tokens"]) == ("vispruner", 192)
    assert results["important_ratio"] == 0.5
    assert "text_source" not in results  # LiteLVLM's knobs from demo.yaml did not leak in
    assert scalars(run_dir)["val/visual_tokens"] == [192.0]


def test_vispruner_by_short_name_in_yaml(tmp_path):
    config = tmp_path / "short.yaml"
    config.write_text("model:\n  pruner:\n    class_path: vispruner\n    init_args:\n      num_tokens: 96\n")
    results, run_dir = run_cli(tmp_path / "logs", "--config", str(config), *QUICK)
    assert (results["pruner"], results["num_tokens"]) == ("vispruner", 96)
    assert scalars(run_dir)["val/visual_tokens"] == [96.0]


# ----------------------------------------------------------------- a pruner outside the package
EXTERNAL_PRUNER = '''
"""A pruner written by a user, outside litelvlm: keep the first R patches in raster order."""
import json

import torch

from litelvlm.pruners import TokenPruner


class FirstPatches(TokenPruner):
    def __init__(self, num_tokens: int = 16, record: str = "") -> None:
        super().__init__(num_tokens=num_tokens)
        self.record = record

    def select(self, signals):
        n, b = signals.num_patches, signals.batch_size
        r = self.budget(n)
        kept = torch.arange(r).expand(b, r).clone()
        if self.record:
            with open(self.record, "a") as f:
                f.write(json.dumps({"num_patches": n, "kept": kept.tolist()}) + "\\n")
        return kept
'''


def test_pruner_defined_outside_the_package_runs_by_class_path(tmp_path):
    module = "user_first_patches_pruner"
    (tmp_path / f"{module}.py").write_text(EXTERNAL_PRUNER)
    record = tmp_path / "select_calls.jsonl"
    config = tmp_path / "first_patches.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            model:
              pruner:
                class_path: {module}.FirstPatches
                init_args:
                  num_tokens: 37
                  record: {record}
            """
        )
    )
    env = dict(os.environ)  # keeps LITELVLM_CACHE, the private cache conftest set
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    save_dir = tmp_path / "logs"
    command = [
        sys.executable, "-m", "litelvlm.cli", "validate", "--config", DEMO, "--config", str(config),
        "--trainer.limit_val_batches", "2", "--data.max_sentences", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (results_file,) = save_dir.rglob("results.json")
    results = json.loads(results_file.read_text())
    assert (results["pruner"], results["num_tokens"]) == ("FirstPatches", 37)
    assert results["num_samples"] == 4
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 2  # one select per batch
    for call in calls:
        assert call["num_patches"] == NUM_PATCHES
        assert call["kept"] == [list(range(37))] * 2
    # What the LLM finally reasoned over: exactly the R tokens the user's pruner kept.
    assert scalars(results_file.parent)["val/visual_tokens"] == [37.0]
    assert "FirstPatches" in done.stdout


# ------------------------------------------------------------------------------- test subcommand
def test_test_subcommand_writes_results(tmp_path):
    results, run_dir = run_cli(
        tmp_path,
        "--data.split", "test", "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
        subcommand="test",
    )  # fmt: skip
    assert results["stage"] == "test"
    assert (results["pruner"], results["num_tokens"]) == ("litelvlm", 192)
    assert results["num_samples"] == count_masks(demo_data_dir(), "test", max_sentences=3, num_images=4)
    logged = scalars(run_dir)
    assert logged["test/ciou"][0] == pytest.approx(results["ciou"], abs=1e-6)
    assert logged["test/giou"][0] == pytest.approx(results["giou"], abs=1e-6)
    assert logged["test/visual_tokens"] == [192.0]


# ----------------------------------------------------------------------------------- bad input
def _bad_run(tmp_path, capsys, *args: str) -> str:
    """Run the CLI on bad input: it must exit with code 2 and print no traceback; returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["validate", "--config", DEMO, *args, *QUICK, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert not list(tmp_path.rglob("results.json"))
    return stderr


def _one_line_naming(stderr: str, *phrases: str) -> str:
    """The single stderr line that names the problem (all phrases, case-insensitive)."""
    lines = [line for line in stderr.splitlines() if all(p.lower() in line.lower() for p in phrases)]
    assert lines, f"no single line of stderr names {phrases}:\n{stderr}"
    assert "error" in stderr.lower()
    return lines[0]


def _unknown_pruner_config(tmp_path) -> str:
    config = tmp_path / "unknown.yaml"
    config.write_text("model:\n  pruner:\n    class_path: nosuchpruner\n    init_args:\n      num_tokens: 64\n")
    return str(config)


def test_unknown_pruner_in_config_exits_2_without_traceback(tmp_path, capsys):
    stderr = _bad_run(tmp_path, capsys, "--config", _unknown_pruner_config(tmp_path))
    assert "nosuchpruner" in stderr


def test_unknown_pruner_in_config_says_so(tmp_path, capsys):
    stderr = _bad_run(tmp_path, capsys, "--config", _unknown_pruner_config(tmp_path))
    line = _one_line_naming(stderr, "nosuchpruner", "unknown pruner")
    assert "vispruner" in line and "fastv" in line  # the names one could have meant


def test_num_tokens_zero_is_a_clear_error(tmp_path, capsys):
    stderr = _bad_run(tmp_path, capsys, "--model.pruner.num_tokens", "0")
    _one_line_naming(stderr, "num_tokens", ">= 1", "0")


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (("--model.pruner.num_tokens", "1000"), ("litelvlm: error:", "num_tokens=1000", str(NUM_PATCHES))),
        (("--data.data_dir", "/nonexistent/folder"), ("litelvlm: error:", "/nonexistent/folder", "does not exist")),
        (("--model.checkpoint", "no-such-model"), ("litelvlm: error:", "no-such-model", "not found")),
    ],
    ids=["num_tokens-above-N", "missing-data-folder", "unknown-checkpoint"],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys, args, phrases):
    stderr = _bad_run(tmp_path, capsys, *args)
    line = _one_line_naming(stderr, *phrases)
    assert line.startswith("litelvlm: error:"), line
