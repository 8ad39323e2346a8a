"""ReasonSeg evaluated end to end: ignore pixels in the metric, results per query kind, records, DDP."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from process_helpers import run_in_session

from litelvlm.cli import main
from litelvlm.data.reasonseg import mask_from_json
from litelvlm.data.synthetic import generate_synthetic_reasonseg
from litelvlm.engine.records import read_records
from litelvlm.engine.scores import iou_from_scores, score_masks
from litelvlm.models.loading import load_assets

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
RUN_ARGS = ("--data.dataset", "reasonseg", "--data.split", "val", "--data.batch_size", "2", "--trainer.enable_progress_bar", "false")


def intersection_and_union(output: np.ndarray, target: np.ndarray, classes: int = 2, ignore_index: int = 255):
    """LISA's intersectionAndUnionGPU (utils/utils.py lines 116-128) written out in numpy: pixels
    where the target is ignore_index are set to it in the output, then per-class histograms."""
    output, target = output.reshape(-1).copy(), target.reshape(-1)
    output[target == ignore_index] = ignore_index
    intersection = output[output == target]
    area_intersection = np.array([(intersection == k).sum() for k in range(classes)])
    area_output = np.array([(output == k).sum() for k in range(classes)])
    area_target = np.array([(target == k).sum() for k in range(classes)])
    return area_intersection, area_output + area_target - area_intersection


def test_ignore_pixels_match_lisa_intersection_and_union():
    generator = torch.Generator().manual_seed(0)
    logits, labels = [], []
    for height, width in ((9, 11), (6, 5), (7, 7)):
        logits.append(torch.randn((1, height, width), generator=generator))
        label = torch.randint(0, 2, (height, width), generator=generator).numpy().astype(np.uint8)
        label[torch.rand((height, width), generator=generator).numpy() < 0.3] = 255
        labels.append(label)
    labels[2][:] = 255  # everything ignored: union 0, IoU 1 (LISA's no-object rule), nothing in cIoU
    scores = score_masks(
        logits,
        [torch.from_numpy(label == 1)[None] for label in labels],
        retained_tokens=7,
        ignore_masks=[torch.from_numpy(label == 255)[None] for label in labels],
    )
    expected_i, expected_u, ious = [], [], []
    for logit, label in zip(logits, labels):
        area_i, area_u = intersection_and_union((logit[0] > 0).numpy().astype(np.uint8), label)
        expected_i.append(int(area_i[1]))
        expected_u.append(int(area_u[1]))
        ious.append(area_i[1] / (area_u[1] + 1e-5) + (1.0 if area_u[1] == 0 else 0.0))  # train_ds.py validate
    assert scores.intersection.tolist() == expected_i and scores.union.tolist() == expected_u
    assert expected_u[2] == 0 and min(expected_u[:2]) > 0  # the cases are what they claim
    metric = iou_from_scores(expected_i, expected_u)
    assert metric["ciou"] == pytest.approx(sum(expected_i) / sum(expected_u))
    assert metric["giou"] == pytest.approx(float(np.mean(ious)), abs=1e-5)
    without = score_masks(logits, [torch.from_numpy(label == 1)[None] for label in labels], 7)
    assert (without.union >= scores.union).all() and (without.union > scores.union).any()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return generate_synthetic_reasonseg(tmp_path_factory.mktemp("reasonseg"), {"val": 5})


def annotations(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((folder / "val").glob("*.json"))]


def run_cli(folder: Path, save_dir: Path, *extra: str) -> tuple[dict, Path]:
    args = ["validate", "--config", DEMO, *RUN_ARGS, "--data.data_dir", str(folder.parent), *extra]
    args += ["--trainer.devices", "1", "--trainer.logger.init_args.save_dir", str(save_dir)]
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(args)
    (results_file,) = save_dir.rglob("results.json")
    return json.loads(results_file.read_text()), results_file.parent


@pytest.fixture(scope="module")
def one_process(folder, tmp_path_factory) -> tuple[dict, Path]:
    return run_cli(folder, tmp_path_factory.mktemp("one"))


def test_results_all_short_long_and_records(folder, one_process):
    results, run = one_process
    kinds = [item["is_sentence"] for item in annotations(folder)]
    assert results["num_samples"] == 5  # lisa-reasonseg: one (the first) query per image
    assert results["by_query_kind"]["short"]["num_samples"] == kinds.count(False) == 3
    assert results["by_query_kind"]["long"]["num_samples"] == kinds.count(True) == 2
    table = read_records(run).to_pylist()
    assert [row["is_sentence"] for row in table] == kinds
    for name, flag in (("short", False), ("long", True)):
        rows = [row for row in table if row["is_sentence"] is flag]
        point = iou_from_scores([row["intersection"] for row in rows], [row["union"] for row in rows])
        assert results["by_query_kind"][name]["ciou"] == pytest.approx(point["ciou"], abs=1e-12)
        assert results["by_query_kind"][name]["giou"] == pytest.approx(point["giou"], abs=1e-12)
    everything = iou_from_scores([row["intersection"] for row in table], [row["union"] for row in table])
    assert results["ciou"] == pytest.approx(everything["ciou"], abs=1e-12)
    # Ignore pixels are in no union: a union never exceeds the image's non-ignored pixels.
    for row, item, path in zip(table, annotations(folder), sorted((folder / "val").glob("*.jpg"))):
        from PIL import Image

        width, height = Image.open(path).size
        labels = mask_from_json(item, height, width)
        assert row["union"] <= int((labels != 255).sum())
        assert row["intersection"] <= int((labels == 1).sum())
    assets = load_assets("tiny-glamm")
    queries = [item["text"][0].strip() for item in annotations(folder)]
    assert [row["query_llm_tokens"] for row in table] == [
        len(assets.llm_tokenizer(query, add_special_tokens=False)["input_ids"]) for query in queries
    ]
    assert [row["query_clip_tokens"] for row in table] == [len(assets.clip_tokenizer(query)["input_ids"]) for query in queries]


def test_every_query_protocol(folder, tmp_path):
    results, _ = run_cli(folder, tmp_path, "--data.protocol", "per-sentence", "--model.pruner", "none")
    items = annotations(folder)
    assert results["num_samples"] == sum(len(item["text"]) for item in items)
    long_queries = sum(len(item["text"]) for item in items if item["is_sentence"])
    assert results["by_query_kind"]["long"]["num_samples"] == long_queries


def test_two_process_ddp_matches_one_process(folder, one_process, tmp_path):
    save_dir = tmp_path / "logs"
    command = [
        sys.executable, "-m", "litelvlm.cli", "validate", "--config", DEMO, *RUN_ARGS,
        "--data.data_dir", str(folder), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--trainer.logger.init_args.save_dir", str(save_dir),
    ]  # fmt: skip
    done = run_in_session(command, tmp_path, 300)
    assert done.returncode == 0, done.stderr[-4000:]
    (found,) = save_dir.rglob("results.json")
    multi, single = json.loads(found.read_text()), one_process[0]
    assert multi["num_samples"] == single["num_samples"] == 5
    for kind in ("short", "long"):
        assert multi["by_query_kind"][kind]["num_samples"] == single["by_query_kind"][kind]["num_samples"]
        for key in ("ciou", "giou"):
            assert multi["by_query_kind"][kind][key] == pytest.approx(single["by_query_kind"][kind][key], abs=1e-6)
    assert multi["ciou"] == pytest.approx(single["ciou"], abs=1e-6)
    assert multi["giou"] == pytest.approx(single["giou"], abs=1e-6)
    rows = read_records(found.parent).to_pylist()
    assert sorted(row["sample_id"] for row in rows) == list(range(5))  # every image scored exactly once


def test_compare_reports_each_query_kind_from_the_records(compare_tool, tmp_path, capsys):
    """Hand-made records: short A (2/4); long B (3/6) and C (1/1). Each kind is its own split row."""
    import pyarrow as pa

    from litelvlm.engine.records import SCHEMA, PartWriter, build_manifest, write_manifest

    masks = [("A", False, 2, 4), ("B", True, 3, 6), ("C", True, 1, 1)]
    rows = [
        {"split": "reasonseg/val", "sample_id": number, "image_id": image, "sentence_id": f"{image}:0", "mask_index": 0,
         "configuration": "none", "intersection": i, "union": u, "retained_tokens": 256, "is_sentence": flag,
         "query_llm_tokens": 5, "query_clip_tokens": 7}
        for number, (image, flag, i, u) in enumerate(masks)
    ]  # fmt: skip
    PartWriter(tmp_path / "records", attempt=0, rank=0).write(pa.Table.from_pylist(rows, schema=SCHEMA))
    write_manifest(tmp_path, build_manifest("validate", {"checkpoint": "handmade"}, [{"name": "none"}], {"splits": []}))
    table, knobs = compare_tool.load_runs([tmp_path])
    results = {row["split"]: row for row in compare_tool.compare(compare_tool.with_query_kinds(table), knobs, num_bootstrap=200)}
    assert list(results) == ["reasonseg/val", "reasonseg/val/short", "reasonseg/val/long"]
    assert (results["reasonseg/val"]["ciou"], results["reasonseg/val"]["num_images"]) == (6 / 11, 3)
    assert (results["reasonseg/val/short"]["ciou"], results["reasonseg/val/short"]["giou"]) == (0.5, 0.5)
    assert (results["reasonseg/val/long"]["ciou"], results["reasonseg/val/long"]["giou"]) == (4 / 7, 0.75)
    assert results["reasonseg/val/long"]["num_images"] == 2
    assert results["reasonseg/val/long"]["ciou_low"] <= 4 / 7 <= results["reasonseg/val/long"]["ciou_high"]
    assert compare_tool.main([str(tmp_path), "--no-query-kinds", "--bootstrap", "50"]) == 0
    assert "reasonseg/val/short" not in capsys.readouterr().out


def test_resume_restores_each_query_kind(folder, one_process, tmp_path):
    """A run that lost its last batch's records resumes to the same numbers, per query kind too."""
    import shutil

    single, run = one_process
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    parts = sorted((copy / "records").glob("part-*.parquet"))
    assert len(parts) == 3  # 5 images in batches of 2
    parts[-1].unlink()
    (copy / "results.json").unlink()
    args = ["validate", "--config", DEMO, *RUN_ARGS, "--data.data_dir", str(folder), "--trainer.devices", "1"]
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main([*args, "--resume", str(copy)])
    resumed = json.loads((copy / "results.json").read_text())
    assert resumed["by_query_kind"] == single["by_query_kind"]
    assert (resumed["ciou"], resumed["giou"], resumed["num_samples"]) == (single["ciou"], single["giou"], 5)


def test_two_shards_merged_equal_one_run_per_query_kind(folder, one_process, tmp_path):
    """`--data.shard i/2` parts merged by tools/merge_runs.py give the one-process by_query_kind."""
    from litelvlm.engine.merge import merge_runs
    from litelvlm.engine.records import metrics_from_records

    single, run = one_process
    (from_records,) = metrics_from_records(run)
    assert from_records["by_query_kind"] == single["by_query_kind"]
    parts = [run_cli(folder, tmp_path / f"part{index}", "--data.shard", f"{index}/2")[1] for index in range(2)]
    (merged,) = merge_runs(tmp_path / "merged", parts)
    assert merged["by_query_kind"] == single["by_query_kind"]
    assert (merged["ciou"], merged["num_samples"]) == (single["ciou"], 5)
