"""Two-process CPU DDP evaluation gives exactly the numbers of one process: no mask counted twice or lost.

The split has an ODD number of images (5) so that a padding sampler (Lightning's default
DistributedSampler) would hand rank 1 a repeat of image 0 and change num_samples and the metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pyarrow.parquet as pq
import pytest

from process_helpers import run_in_session

from litelvlm.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
NUM_IMAGES = 5
BATCH_SIZE = 2  # rank 0: images 0, 2, 4 (2 batches); rank 1: images 1, 3 (1 batch)
MAX_SENTENCES = 3
# The same evaluation, spelled out, for the CLI runs and the plain-Trainer driver below.
EVAL_ARGS = (
    "--model.pruner", "litelvlm", "--model.pruner.num_tokens", "192",
    "--data.batch_size", str(BATCH_SIZE), "--data.max_sentences", str(MAX_SENTENCES), "--data.seed", "0",
    "--trainer.enable_progress_bar", "false",
)  # fmt: skip
DDP_TIMEOUT_S = 240


def count_masks(data_dir: Path, split: str, max_sentences: int | None) -> int:
    """Masks scored over the whole split, from the parquet rows: per image min(sentences, max)."""
    per_image: dict[str, int] = {}
    for file in sorted(Path(data_dir).glob(f"data/{split}-*.parquet")):
        table = pq.read_table(file, columns=["file_name", "answer"]).to_pydict()
        for file_name, answer in zip(table["file_name"], table["answer"]):
            image = Path(file_name).stem.rsplit("_", 1)[0]
            per_image[image] = per_image.get(image, 0) + len(answer)
    assert len(per_image) == NUM_IMAGES
    return sum(n if max_sentences is None else min(n, max_sentences) for n in per_image.values())


@pytest.fixture(scope="module")
def odd_split(tmp_path_factory) -> Path:
    from litelvlm.data.synthetic import generate_synthetic_refcoco

    return generate_synthetic_refcoco(tmp_path_factory.mktemp("odd_split"), num_images=NUM_IMAGES, seed=0)


@pytest.fixture(scope="module")
def expected_masks(odd_split) -> int:
    return count_masks(odd_split, "val", MAX_SENTENCES)


@pytest.fixture(scope="module")
def one_process(odd_split, tmp_path_factory) -> dict:
    """The reference: the same evaluation on one process, in-process through the CLI."""
    save_dir = tmp_path_factory.mktemp("one_process")
    args = ["validate", "--config", DEMO, *EVAL_ARGS, "--data.data_dir", str(odd_split)]
    args += ["--trainer.devices", "1", "--trainer.logger.init_args.save_dir", str(save_dir)]
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(args)
    (results_file,) = save_dir.rglob("results.json")
    return json.loads(results_file.read_text())


def run_ddp(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a 2-process job in its own session, so a hang can be killed with all its ranks."""
    return run_in_session(command, cwd, DDP_TIMEOUT_S)


def assert_same_numbers(multi: dict, single: dict, expected_masks: int) -> None:
    assert single["num_samples"] == expected_masks  # the reference itself scores every mask once
    assert multi["num_samples"] == expected_masks
    assert multi["ciou"] == pytest.approx(single["ciou"], abs=1e-6)
    assert multi["giou"] == pytest.approx(single["giou"], abs=1e-6)


def test_cli_two_process_ddp_matches_one_process(odd_split, one_process, expected_masks, tmp_path):
    save_dir = tmp_path / "logs"
    command = [
        sys.executable, "-m", "litelvlm.cli", "validate", "--config", DEMO, *EVAL_ARGS,
        "--data.data_dir", str(odd_split), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--trainer.logger.init_args.save_dir", str(save_dir),
    ]  # fmt: skip
    done = run_ddp(command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    found = list(save_dir.rglob("results.json"))
    assert len(found) == 1, found  # written once, by rank 0
    assert_same_numbers(json.loads(found[0].read_text()), one_process, expected_masks)


# The same evaluation under a plain Trainer (no CLI, no report callback), so the distributed
# semantics themselves (sampler + metric reduction) are pinned independently of the CLI's callback.
DRIVER = '''
import json, sys
from pathlib import Path

import lightning as L

from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.pruners import build_pruner

data_dir, out = sys.argv[1], Path(sys.argv[2])


class RecordSamples(L.Callback):
    def __init__(self):
        self.seen = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen += [int(i) for i in batch.sample_ids]

    def on_validation_end(self, trainer, pl_module):
        loader = trainer.val_dataloaders
        record = {"world_size": trainer.world_size, "sampler": type(loader.sampler).__name__, "seen": self.seen}
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


model = ReferringSegmentationModule(checkpoint="tiny-glamm", pruner=build_pruner("litelvlm", num_tokens=192))
data = ReferringDataModule(data_dir=data_dir, batch_size=%(batch_size)d, max_sentences=%(max_sentences)d, seed=0)
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", logger=False, callbacks=[RecordSamples()],
    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
)
trainer.validate(model, datamodule=data, verbose=False)
if trainer.is_global_zero:
    (out / "results.json").write_text(json.dumps(model.last_results))
''' % {"batch_size": BATCH_SIZE, "max_sentences": MAX_SENTENCES}


def test_two_process_ddp_evaluation_matches_one_process(odd_split, one_process, expected_masks, tmp_path):
    script = tmp_path / "ddp_driver.py"
    script.write_text(DRIVER)
    out = tmp_path / "out"
    out.mkdir()
    done = run_ddp([sys.executable, str(script), str(odd_split), str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["sampler"] == "UnpaddedDistributedSampler"  # Lightning kept it
    # Every image on exactly one rank: nothing repeated to even out the ranks, nothing dropped.
    assert ranks[0]["seen"] == [0, 2, 4]
    assert ranks[1]["seen"] == [1, 3]
    assert_same_numbers(json.loads((out / "results.json").read_text()), one_process, expected_masks)
