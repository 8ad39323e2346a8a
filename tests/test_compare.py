"""tools/compare.py on handmade records: hand-computed cIoU/gIoU and paired differences, image-level
bootstrap intervals that are reproducible under the seed and shrink as images are added."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pytest

from litelvlm.engine.records import SCHEMA, PartWriter, build_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]

# (image, sentence) -> (intersection, union) per configuration.
HANDMADE = {
    "none": {("A", "a1"): (2, 4), ("A", "a2"): (3, 3), ("B", "b1"): (0, 5), ("C", "c1"): (0, 0)},
    "fastv@64": {("A", "a1"): (1, 4), ("A", "a2"): (3, 6), ("B", "b1"): (2, 5), ("C", "c1"): (0, 2)},
}
# cIoU = sum I / sum U; gIoU = mean I / U with an empty union counting 1.
NONE_CIOU, NONE_GIOU = 5 / 12, (0.5 + 1 + 0 + 1) / 4
FASTV_CIOU, FASTV_GIOU = 6 / 17, (0.25 + 0.5 + 0.4 + 0) / 4


def write_run(folder: Path, scores: dict[str, dict], copies: int = 1, split: str = "val") -> Path:
    """A run folder with records (one part file per image) and a manifest; `copies` repeats every
    image under new ids, the same data seen `copies` times over."""
    rows = []
    for configuration, by_mask in scores.items():
        for copy in range(copies):
            for index, ((image, sentence), (intersection, union)) in enumerate(by_mask.items()):
                budget = configuration.partition("@")[2]
                rows.append(
                    {"split": split, "sample_id": copy * 100 + ord(image[0]), "image_id": f"{image}{copy}",
                     "sentence_id": f"{sentence}-{copy}", "mask_index": index, "configuration": configuration,
                     "intersection": intersection, "union": union, "retained_tokens": int(budget) if budget else 576}
                )  # fmt: skip
    PartWriter(folder / "records", attempt=0, rank=0).write(pa.Table.from_pylist(rows, schema=SCHEMA))
    configurations = [
        {"name": name, "pruner": name.partition("@")[0], "num_tokens": int(name.partition("@")[2]) if "@" in name else None}
        for name in scores
    ]
    write_manifest(folder, build_manifest("validate", {"checkpoint": "handmade"}, configurations, {"splits": []}))
    return folder


def rows_by_name(results: list[dict]) -> dict[str, dict]:
    return {row["configuration"]: row for row in results}


def run_compare(compare_tool, runs: list[Path], **kwargs) -> dict[str, dict]:
    table, knobs = compare_tool.load_runs(runs)
    return rows_by_name(compare_tool.compare(table, knobs, **kwargs))


def test_point_estimates_and_paired_differences_are_the_hand_computed_ones(compare_tool, tmp_path):
    results = run_compare(compare_tool, [write_run(tmp_path, HANDMADE)], baseline="none")
    none, fastv = results["none"], results["fastv@64"]
    assert (none["ciou"], none["giou"]) == (NONE_CIOU, NONE_GIOU)
    assert fastv["ciou"] == FASTV_CIOU
    assert fastv["giou"] == pytest.approx(FASTV_GIOU, abs=1e-9)
    assert (none["num_images"], none["num_masks"], fastv["retained_tokens"], none["retained_tokens"]) == (3, 4, 64, 576)
    assert fastv["num_paired_masks"] == 4
    assert fastv["delta_ciou"] == pytest.approx(FASTV_CIOU - NONE_CIOU, abs=1e-15)
    assert fastv["delta_giou"] == pytest.approx(FASTV_GIOU - NONE_GIOU, abs=1e-9)
    # The baseline against itself: every resample gives exactly 0.
    assert (none["delta_ciou"], none["delta_ciou_low"], none["delta_ciou_high"]) == (0.0, 0.0, 0.0)
    for row in results.values():
        assert row["ciou_low"] <= row["ciou"] <= row["ciou_high"]
        assert row["giou_low"] <= row["giou"] <= row["giou_high"]


def test_bootstrap_resamples_images_not_masks(compare_tool, tmp_path):
    """Image P: 50 masks of IoU 1; image Q: 50 masks of IoU 0. Resampling images, a resample holds
    PP, PQ or QQ (gIoU 1, 0.5, 0; a quarter of the resamples each end), so the 95% interval is
    [0, 1]. Resampling the 100 masks independently would give about 0.5 +- 0.1."""
    scores = {"none": {**{("P", f"p{i}"): (1, 1) for i in range(50)}, **{("Q", f"q{i}"): (0, 1) for i in range(50)}}}
    row = run_compare(compare_tool, [write_run(tmp_path, scores)])["none"]
    assert row["giou"] == 0.5
    assert (row["giou_low"], row["giou_high"]) == (0.0, 1.0)


def test_intervals_are_reproducible_under_the_seed(compare_tool, tmp_path):
    varied = {
        "none": {(f"I{k}", "s"): (k % 7, 7 + k % 5) for k in range(20)},
        "fastv@64": {(f"I{k}", "s"): (k % 5, 6 + k % 4) for k in range(20)},
    }
    run = write_run(tmp_path, varied)
    first = run_compare(compare_tool, [run], baseline="none", seed=7)
    assert run_compare(compare_tool, [run], baseline="none", seed=7) == first
    other = run_compare(compare_tool, [run], baseline="none", seed=8)
    assert other["fastv@64"]["ciou_low"] != first["fastv@64"]["ciou_low"]
    assert other["fastv@64"]["delta_ciou_high"] != first["fastv@64"]["delta_ciou_high"]
    assert other["fastv@64"]["ciou"] == first["fastv@64"]["ciou"]  # the point estimate does not resample


def test_intervals_shrink_as_images_are_added(compare_tool, tmp_path):
    widths = []
    for copies in (2, 8, 32):
        row = run_compare(compare_tool, [write_run(tmp_path / str(copies), HANDMADE, copies)], baseline="none")["fastv@64"]
        assert row["ciou"] == FASTV_CIOU  # the same data, seen more often
        widths.append((row["ciou_high"] - row["ciou_low"], row["delta_ciou_high"] - row["delta_ciou_low"]))
    assert widths[0][0] > widths[1][0] > widths[2][0] > 0
    assert widths[0][1] > widths[1][1] > widths[2][1] > 0


def test_cli_writes_markdown_csv_and_plot_across_runs(compare_tool, tmp_path, capsys):
    first = write_run(tmp_path / "sweep", HANDMADE)
    second = write_run(tmp_path / "single", {"litelvlm@32": HANDMADE["fastv@64"]})
    out = tmp_path / "out"
    assert compare_tool.main([str(first), str(second), "--baseline", "none", "--out", str(out), "--bootstrap", "200"]) == 0
    markdown = (out / "compare.md").read_text()
    assert "| val | none | - | 576 | 4 | 41.67 [" in markdown  # 5 / 12; no budget
    assert "| val | litelvlm@32 | 32 | 32 | 4 | 35.29 [" in markdown  # 6 / 17; budget 32, 32 tokens
    assert "ΔcIoU vs none" in markdown and "| -6.37 [" in markdown  # 6/17 - 5/12 = -0.0637
    assert markdown.strip() in capsys.readouterr().out
    with open(out / "compare.csv") as handle:
        rows = {row["configuration"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"none", "fastv@64", "litelvlm@32"}
    assert float(rows["fastv@64"]["ciou"]) == FASTV_CIOU
    assert float(rows["litelvlm@32"]["delta_ciou"]) == pytest.approx(FASTV_CIOU - NONE_CIOU, abs=1e-15)
    assert (rows["litelvlm@32"]["method"], rows["litelvlm@32"]["num_tokens"]) == ("litelvlm", "32")
    assert (out / "ciou_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_name_in_several_runs_is_told_apart_by_its_run(compare_tool, tmp_path):
    first, second = write_run(tmp_path / "a" / "run", HANDMADE), write_run(tmp_path / "b" / "run", HANDMADE)
    table, _ = compare_tool.load_runs([first, second])
    assert set(table["configuration"].to_pylist()) == {"a/run:none", "a/run:fastv@64", "b/run:none", "b/run:fastv@64"}


def test_unknown_baseline_is_one_clear_line(compare_tool, tmp_path, capsys):
    assert compare_tool.main([str(write_run(tmp_path, HANDMADE)), "--baseline", "fastv@192"]) == 2
    assert "compare: error: baseline 'fastv@192' is not among the configurations: none, fastv@64" in capsys.readouterr().err


def test_paired_runs_compare_each_configuration_with_its_namesake(compare_tool, tmp_path, capsys):
    """Training-free vs fine-tuned: `finetuned:X` is paired with `training-free:X`, budget by budget."""
    free = write_run(tmp_path / "free", {"none": HANDMADE["none"], "litelvlm@64": HANDMADE["fastv@64"]})
    tuned = write_run(tmp_path / "tuned", {"none": HANDMADE["fastv@64"], "litelvlm@64": HANDMADE["none"]})
    out = tmp_path / "out"
    argv = [str(free), str(tuned), "--labels", "training-free", "finetuned", "--paired-run", "training-free"]
    assert compare_tool.main(argv + ["--out", str(out), "--bootstrap", "200"]) == 0
    with open(out / "compare.csv") as handle:
        rows = {row["configuration"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"training-free:none", "training-free:litelvlm@64", "finetuned:none", "finetuned:litelvlm@64"}
    assert rows["finetuned:litelvlm@64"]["baseline"] == "training-free:litelvlm@64"
    assert float(rows["finetuned:litelvlm@64"]["delta_ciou"]) == pytest.approx(NONE_CIOU - FASTV_CIOU, abs=1e-15)
    assert float(rows["finetuned:none"]["delta_giou"]) == pytest.approx(FASTV_GIOU - NONE_GIOU, abs=1e-9)  # per-mask IoU in fixed point (2**-32)
    assert rows["training-free:none"]["baseline"] == "" and rows["training-free:none"]["delta_ciou"] == ""
    assert rows["finetuned:litelvlm@64"]["num_tokens"] == "64"
    markdown = (out / "compare.md").read_text()
    assert "| vs | ΔcIoU | ΔgIoU |" in markdown and "| training-free:litelvlm@64 | +6.37 [" in markdown
    capsys.readouterr()


def test_paired_run_needs_labels_and_a_known_label(compare_tool, tmp_path, capsys):
    free, tuned = write_run(tmp_path / "free", HANDMADE), write_run(tmp_path / "tuned", HANDMADE)
    assert compare_tool.main([str(free), str(tuned), "--paired-run", "training-free"]) == 2
    assert "--paired-run needs --labels" in capsys.readouterr().err
    assert compare_tool.main([str(free), str(tuned), "--labels", "a", "b", "--paired-run", "c"]) == 2
    assert "--paired-run 'c' is not one of the --labels" in capsys.readouterr().err
    assert compare_tool.main([str(free), str(tuned), "--labels", "a"]) == 2
    assert "one distinct label per run" in capsys.readouterr().err


def test_a_single_image_interval_holds_its_point_value_exactly(compare_tool, tmp_path):
    """One image: every resample is that image, so both intervals collapse onto the point values."""
    folder = write_run(tmp_path, {"none": {("A", "a1"): (1, 3), ("A", "a2"): (2, 7)}})
    table, knobs = compare_tool.load_runs([folder])
    (row,) = compare_tool.compare(table, knobs, num_bootstrap=50)
    assert row["ciou_low"] == row["ciou"] == row["ciou_high"] == 3 / 10
    assert row["giou_low"] == row["giou"] == row["giou_high"]
    assert row["giou"] == pytest.approx((1 / 3 + 2 / 7) / 2, abs=1e-9)
