"""tools/prepare_data.py: what is missing and where to get it; conversion to the parquet schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

from litelvlm.data.refcoco_original import OriginalReferringDataset
from litelvlm.data.refcoco_parquet import ReferringImageDataset
from test_data_original import coco_name, ref, sentence, write_original_layout

TOOL = Path(__file__).resolve().parents[1] / "tools" / "prepare_data.py"


@pytest.fixture(scope="module")
def prepare_data():
    yield load_script(TOOL, "prepare_data")
    sys.modules.pop("prepare_data", None)


def test_an_empty_folder_lists_every_missing_piece_with_its_path_and_source(prepare_data, tmp_path, capsys):
    assert prepare_data.main([str(tmp_path), "--dataset", "refcoco", "--dataset", "refcocog", "--dataset", "grefcoco"]) == 1
    printed = capsys.readouterr().out
    expected_paths = [
        tmp_path / "coco_2014" / "train2014",
        tmp_path / "Refer_Segm" / "refcoco" / "refs(unc).p",
        tmp_path / "Refer_Segm" / "refcoco" / "instances.json",
        tmp_path / "Refer_Segm" / "refcocog" / "refs(umd).p",
        tmp_path / "Refer_Segm" / "refcocog" / "instances.json",
        tmp_path / "Refer_Segm" / "grefcoco" / "grefs(unc).json",
        tmp_path / "Refer_Segm" / "grefcoco" / "instances.json",
    ]
    for path in expected_paths:
        assert f"at:  {path}\n" in printed
    assert "MISSING (7)" in printed
    assert "images.cocodataset.org/zips/train2014.zip" in printed
    assert "lichengunc/refer" in printed and "refcocog.zip" in printed
    assert "henghuiding/gRefCOCO" in printed


def test_a_complete_folder_passes_and_summarises_its_splits(prepare_data, tmp_path, capsys):
    write_original_layout(tmp_path)
    report = prepare_data.check_layout(tmp_path, ["refcoco"], ["val", "testA"])
    assert report.complete, prepare_data.format_report(report)
    assert [(s.split, s.images, s.refs, s.sentences) for s in report.splits] == [("val", 2, 4, 7), ("testA", 1, 1, 1)]
    assert prepare_data.main([str(tmp_path), "--dataset", "refcoco", "--split", "val"]) == 0
    assert "complete: nothing is missing" in capsys.readouterr().out


def test_a_benchmark_split_absent_from_the_refs_file_is_missing(prepare_data, tmp_path):
    write_original_layout(tmp_path)  # holds val, testA and train, not testB
    report = prepare_data.check_layout(tmp_path, ["refcoco"])
    [finding] = report.missing
    assert finding.what == "the 'testB' split of refcoco"
    assert finding.path == tmp_path / "Refer_Segm" / "refcoco" / "refs(unc).p"


def test_missing_images_are_named_one_by_one(prepare_data, tmp_path):
    write_original_layout(tmp_path)
    (tmp_path / "coco_2014" / "train2014" / coco_name(2)).unlink()
    report = prepare_data.check_layout(tmp_path, ["refcoco"], ["val"])
    [finding] = report.missing
    assert finding.what == f"1 of the 2 images of refcoco val: {coco_name(2)}"
    assert finding.path == tmp_path / "coco_2014" / "train2014"
    assert "train2014.zip" in finding.fix


def test_an_unsafe_refs_pickle_is_reported_not_loaded(prepare_data, tmp_path):
    write_original_layout(tmp_path)
    (tmp_path / "Refer_Segm" / "refcoco" / "refs(unc).p").write_bytes(b"\x80\x02cos\nsystem\n.")
    report = prepare_data.check_layout(tmp_path, ["refcoco"], ["val"])
    [finding] = report.missing
    assert "refused to load the global os.system" in finding.what


# --- conversion to parquet ------------------------------------------------------------------------

SIMPLE_REFS = {  # targets the parquet schema can hold: one polygon, or nothing
    "refcoco": [
        ref(11, 204, 2, "val", sentence("the fractional box", 110), sentence("a small box", 111)),
        ref(1, 101, 1, "val", sentence("the left box", 10)),
    ],
    "grefcoco": [
        ref(7, [101], 1, "val", sentence("the left box", 70)),
        ref(8, [-1], 1, "val", sentence("the purple elephant", 80)),
        ref(11, [204], 2, "val", sentence("the fractional box", 110)),
    ],
}


def assert_same_samples(original, parquet):
    assert len(original) == len(parquet)
    for index in range(len(original)):
        expected, read_back = original[index], parquet[index]
        assert (read_back.image_id, read_back.sentences, read_back.ref_ids) == (
            expected.image_id, expected.sentences, expected.ref_ids)
        np.testing.assert_array_equal(np.asarray(read_back.image), np.asarray(expected.image))
        np.testing.assert_array_equal(read_back.masks, expected.masks)


@pytest.mark.parametrize("dataset", ["refcoco", "grefcoco"])
def test_conversion_reads_back_to_the_same_samples(prepare_data, tmp_path, dataset):
    root = write_original_layout(tmp_path / "data", dataset, refs=SIMPLE_REFS[dataset])
    result = prepare_data.convert_to_parquet(root, dataset, "val", tmp_path / "parquet")
    assert result.path == tmp_path / "parquet" / dataset / "data" / "val-00000-of-00001.parquet"
    assert result.rows == len(SIMPLE_REFS[dataset]) and result.skipped_refs == []
    for max_sentences in (None, 1):
        original = OriginalReferringDataset(root, dataset, "val", max_sentences=max_sentences, seed=3)
        parquet = ReferringImageDataset(tmp_path / "parquet" / dataset, "val", max_sentences=max_sentences, seed=3,
                                        cache_dir=str(tmp_path / "hf"))
        assert_same_samples(original, parquet)
        if dataset == "grefcoco" and max_sentences is None:
            assert parquet[0].sentences[1] == "the purple elephant"
            assert not parquet[0].masks[1].any()  # the empty target survives the round trip


def test_conversion_refuses_targets_the_schema_cannot_hold_and_names_them(prepare_data, tmp_path):
    root = write_original_layout(tmp_path / "data")  # refs 3 (two polygons), 4 and 2 (RLE)
    with pytest.raises(prepare_data.UnrepresentableRefError) as raised:
        prepare_data.convert_to_parquet(root, "refcoco", "val", tmp_path / "parquet")
    message = str(raised.value)
    assert message.startswith("3 refs of refcoco val cannot be written")
    assert "ref 3: its annotation has 2 polygons" in message and "ref 4: its target is an RLE" in message
    assert not (tmp_path / "parquet" / "refcoco" / "data").exists() or not any((tmp_path / "parquet").rglob("*.parquet"))


def test_conversion_can_leave_such_refs_out_and_lists_them(prepare_data, tmp_path, capsys):
    root = write_original_layout(tmp_path / "data")
    out = tmp_path / "parquet"
    assert prepare_data.main([str(root), "--dataset", "refcoco", "--split", "val", "--to-parquet", str(out),
                              "--skip-unrepresentable"]) == 0
    assert "1 refs, 3 refs left out" in capsys.readouterr().out
    listed = json.loads((out / "refcoco" / "skipped-val.json").read_text())
    assert sorted(item["ref_id"] for item in listed) == ["2", "3", "4"]
    parquet = ReferringImageDataset(out / "refcoco", "val", max_sentences=None, cache_dir=str(tmp_path / "hf"))
    [record] = parquet.records
    assert [r.ref_id for r in record.refs] == ["1"]
    assert parquet[0].sentences == ["the left box", "box on the left"]
