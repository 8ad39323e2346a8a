"""`data.on_error: skip`: one undecodable image is one entry in results.json, on one process and two.

The original-layout fixture of test_data_original with a third val image, so the val split is
three images (in file order: image 2, image 1, image 3), one per batch at batch size 1. Under
2-process DDP, rank 0 evaluates items 0 and 2 and rank 1 item 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest

from process_helpers import run_in_session
from test_data_original import REFCOCO_REFS, coco_name, ref, sentence, write_original_layout

from litelvlm.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
VAL_IMAGES = [2, 1, 3]  # item order of the val split
ARGS = (
    "--data.dataset", "refcoco", "--data.on_error", "skip", "--data.batch_size", "1",
    "--model.pruner.num_tokens", "64", "--trainer.enable_progress_bar", "false",
)  # fmt: skip


def layout_with_bad_images(root: Path, bad: list[int]) -> Path:
    refs = [item for item in REFCOCO_REFS if item["ref_id"] != 5]
    refs.append(ref(5, 301, 3, "val", sentence("a small square", 50)))  # image 3 joins the val split
    write_original_layout(root, refs=refs)
    for image_id in bad:
        (root / "coco_2014" / "train2014" / coco_name(image_id)).write_bytes(b"not a jpeg")
    return root


def skipped_entries(save_dir: Path) -> list[dict]:
    (results_file,) = save_dir.rglob("results.json")
    return json.loads(results_file.read_text())["skipped"]


def assert_one_entry_per_bad_image(skipped: list[dict], bad: list[int]) -> None:
    assert sorted(item["index"] for item in skipped) == sorted(VAL_IMAGES.index(image) for image in bad)
    assert sorted(Path(item["file"]).name for item in skipped) == sorted(coco_name(image) for image in bad)
    assert all(item["stage"] == "load" for item in skipped)


@pytest.mark.parametrize("bad", [[1], [2, 3]], ids=["one-bad-image", "two-in-different-batches"])
def test_each_undecodable_image_is_one_skipped_entry(tmp_path, bad):
    root = layout_with_bad_images(tmp_path / "data", bad)
    save_dir = tmp_path / "logs"
    args = ["validate", "--config", DEMO, *ARGS, "--data.data_dir", str(root)]
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(args + ["--trainer.logger.init_args.save_dir", str(save_dir)])
    assert_one_entry_per_bad_image(skipped_entries(save_dir), bad)


def test_each_undecodable_image_is_one_skipped_entry_under_ddp(tmp_path):
    bad = [2, 1]  # item 0 on rank 0, item 1 on rank 1
    root = layout_with_bad_images(tmp_path / "data", bad)
    save_dir = tmp_path / "logs"
    command = [
        sys.executable, "-m", "litelvlm.cli", "validate", "--config", DEMO, *ARGS, "--data.data_dir", str(root),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.logger.init_args.save_dir", str(save_dir),
    ]  # fmt: skip
    done = run_in_session(command, tmp_path, 240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_one_entry_per_bad_image(skipped_entries(save_dir), bad)
    # the metrics are summed over processes before they are logged: no hint that they need sync_dist
    assert "sync_dist" not in done.stderr and "Tip:" not in done.stdout + done.stderr, done.stderr[-4000:]
