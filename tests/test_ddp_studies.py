"""Two-process CPU DDP study runs write exactly the JSON of one process: every sentence once, none missing.

Batches of one image, so each image is encoded alone on either side and the numbers are bit for bit
those of one process (CLIP's batched matmuls change the last bits with the batch's make-up); an odd
number of images (5), so a padding sampler would repeat one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
from test_ddp import run_ddp

from litelvlm.cli import main

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 5
STUDY_ARGS = (
    "--config", str(REPO / "configs/studies/reversal.yaml"),
    "--trainer.callbacks+=litelvlm.analysis.TextAttentionSinkStudy",
    "--data.batch_size", "1", "--data.max_sentences", "3", "--trainer.enable_progress_bar", "false",
)  # fmt: skip
STUDY_FILES = ("reversal.json", "attention_sink.json")


@pytest.fixture(scope="module")
def odd_split(tmp_path_factory) -> Path:
    from litelvlm.data.synthetic import generate_synthetic_refcoco

    return generate_synthetic_refcoco(tmp_path_factory.mktemp("odd_split"), num_images=NUM_IMAGES, seed=0)


def study_outputs(save_dir: Path) -> dict[str, dict]:
    found = {name: list(save_dir.rglob(name)) for name in STUDY_FILES}
    assert all(len(paths) == 1 for paths in found.values()), found  # written once, by rank zero
    return {name: json.loads(paths[0].read_text()) for name, paths in found.items()}


def test_two_process_ddp_study_run_writes_the_json_of_one_process(odd_split, tmp_path, monkeypatch):
    single_dir, multi_dir = tmp_path / "one_process", tmp_path / "two_processes"
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(["validate", *STUDY_ARGS, "--data.data_dir", str(odd_split), "--trainer.devices", "1",
              "--trainer.logger.init_args.save_dir", str(single_dir)])
    single = study_outputs(single_dir)
    command = [
        sys.executable, "-m", "litelvlm.cli", "validate", *STUDY_ARGS, "--data.data_dir", str(odd_split),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.logger.init_args.save_dir", str(multi_dir),
    ]  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = run_ddp(command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    multi = study_outputs(multi_dir)

    for report in (single["reversal.json"], multi["reversal.json"]):
        keys = [(row["sample_id"], row["sentence"]) for row in report["rows"]]
        assert len(keys) == len(set(keys))  # no sentence twice
        assert {sample for sample, _ in keys} == set(range(NUM_IMAGES))  # no image missing
    assert multi["reversal.json"] == single["reversal.json"]
    assert multi["attention_sink.json"] == single["attention_sink.json"]
