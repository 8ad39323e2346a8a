"""ReasonSeg: the mask rule of LISA's get_mask_from_json, the folder reader, its protocols and prompts."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import load_script

from litelvlm.data.masks import MalformedSegmentationError
from litelvlm.data.reasonseg import ReasonSegDataset, mask_from_json, read_annotation
from litelvlm.data.sources import open_referring_dataset
from litelvlm.data.synthetic import generate_synthetic_reasonseg
from litelvlm.errors import DataError
from litelvlm.models.prompts import build_reasonseg_prompt


def shape(label, *points):
    return {"label": label, "points": [list(point) for point in points], "shape_type": "polygon"}


def annotation(*shapes, text=("the cup",), is_sentence=False):
    return {"text": list(text), "is_sentence": is_sentence, "shapes": list(shapes)}


def test_square_with_an_ignore_square_inside():
    """Both drawn with outline + fill, corners included; the smaller ignore square is drawn last."""
    got = mask_from_json(
        annotation(shape("target", (1, 1), (6, 1), (6, 6), (1, 6)), shape("ignore", (3, 3), (4, 3), (4, 4), (3, 4))),
        8,
        9,
    )
    expected = np.zeros((8, 9), dtype=np.uint8)
    expected[1:7, 1:7] = 1
    expected[3:5, 3:5] = 255
    assert got.dtype == np.uint8 and np.array_equal(got, expected)


def test_larger_shapes_are_drawn_first_whatever_the_file_order():
    """A small target listed before a large ignore region still wins its pixels; "flag" is dropped."""
    shapes = [
        shape("target", (2, 2), (3, 2), (3, 3), (2, 3)),
        shape("Ignore area", (0, 0), (7, 0), (7, 5), (0, 5)),
        shape("FLAG", (0, 0), (9, 0), (9, 9), (0, 9)),
    ]
    expected = np.zeros((6, 10), dtype=np.uint8)
    expected[0:6, 0:8] = 255
    expected[2:4, 2:4] = 1
    assert np.array_equal(mask_from_json(annotation(*shapes), 6, 10), expected)


def test_labels_that_only_contain_flag_are_drawn():
    """The reference drops a label equal to "flag"; "flagpole" is a target like any other."""
    got = mask_from_json(annotation(shape("flagpole", (0, 0), (2, 0), (2, 2), (0, 2))), 4, 4)
    assert got[:3, :3].tolist() == [[1] * 3] * 3 and got.sum() == 9


def test_equals_opencv_drawing_of_a_triangle_with_fractional_points():
    """Points are truncated to int32 as the reference does, then outlined and filled by OpenCV."""
    triangle = [(1.9, 0.7), (10.2, 3.99), (2.5, 8.6)]
    reference = np.zeros((10, 12), dtype=np.uint8)
    points = np.array([[(1, 0), (10, 3), (2, 8)]], dtype=np.int32)
    cv2.polylines(reference, points, True, 1, 1)
    cv2.fillPoly(reference, points, 1)
    got = mask_from_json(annotation(shape("target", *triangle)), 10, 12)
    assert np.array_equal(got, reference)
    assert got[0, 1] == 1 and got[8, 2] == 1 and got[3, 10] == 1 and got[9].sum() == 0


def test_bad_points_name_the_shape():
    with pytest.raises(MalformedSegmentationError, match="shape 0 .*non-empty list of \\[x, y\\]"):
        mask_from_json(annotation({"label": "target", "points": [1, 2, 3]}), 4, 4)
    with pytest.raises(MalformedSegmentationError, match="image sizes outside"):
        mask_from_json(annotation(shape("target", (0, 0), (1e9, 0), (0, 1))), 4, 4)


def test_cp1252_fallback(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(json.dumps(annotation(text=["the caf\u00e9 sign"]), ensure_ascii=False).encode("cp1252"))
    assert read_annotation(path)["text"] == ["the caf\u00e9 sign"]
    path.write_text('{"text": ["x"], "shapes": []}')
    with pytest.raises(DataError, match="lacks the keys \\['is_sentence'\\]"):
        read_annotation(path)


@pytest.fixture(scope="module")
def reasonseg_folder(tmp_path_factory):
    return generate_synthetic_reasonseg(tmp_path_factory.mktemp("data"))


def test_reader_accepts_three_levels_and_both_protocols(reasonseg_folder):
    for root in (reasonseg_folder, reasonseg_folder.parent, reasonseg_folder.parent.parent):
        first = ReasonSegDataset(root, "val")
        assert [item for item in first.items] == [(index, [0]) for index in range(6)]
    every = open_referring_dataset(reasonseg_folder.parent.parent, dataset="reasonseg", split="val", protocol="per-sentence")
    annotations = [json.loads(path.read_text()) for path in sorted((reasonseg_folder / "val").glob("*.json"))]
    assert len(every) == sum(len(item["text"]) for item in annotations)
    assert [every[index].sentences[0] for index in range(len(every))] == [q for item in annotations for q in item["text"]]


def test_sample_holds_target_ignore_and_query_kind(reasonseg_folder):
    data = open_referring_dataset(reasonseg_folder, dataset="reasonseg", split="val")  # lisa-reasonseg by default
    for index, path in enumerate(sorted((reasonseg_folder / "val").glob("*.json"))):
        raw = json.loads(path.read_text())
        sample = data[index]
        labels = mask_from_json(raw, sample.image.height, sample.image.width)
        assert sample.sentences == raw["text"][:1] and sample.is_sentence == [raw["is_sentence"]]
        assert np.array_equal(sample.masks[0], labels == 1) and np.array_equal(sample.ignore_masks[0], labels == 255)
    assert data[0].ignore_masks.any() and not data[1].ignore_masks.any()  # the fixture's pattern


def test_reader_errors(reasonseg_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no ReasonSeg split 'val'"):
        ReasonSegDataset(tmp_path, "val")
    with pytest.raises(DataError, match="but not 'train'"):
        ReasonSegDataset(reasonseg_folder, "train")
    with pytest.raises(DataError, match="lisa-reasonseg or per-sentence"):
        ReasonSegDataset(reasonseg_folder, "val", protocol="glamm")
    with pytest.raises(DataError, match="lisa-reasonseg is ReasonSeg's"):
        open_referring_dataset(reasonseg_folder, dataset="refcoco", protocol="lisa-reasonseg")
    broken = generate_synthetic_reasonseg(tmp_path / "broken", {"val": 3})
    (broken / "val" / "synthetic_val_0001.json").unlink()
    with pytest.raises(FileNotFoundError, match="synthetic_val_0001.jpg has no annotation"):
        ReasonSegDataset(broken, "val")
    kept = ReasonSegDataset(broken, "val", on_error="skip")
    assert [record.image_id for record in kept.records] == ["synthetic_val_0000", "synthetic_val_0002"]
    assert [item.image_id for item in kept.skipped] == ["synthetic_val_0001"]


def test_prompts_follow_lisa_validation():
    long = build_reasonseg_prompt("  What keeps Food cold? ", True, use_im_start_end=False)
    assert "USER: <image>\n What keeps Food cold? Please output segmentation mask. ASSISTANT: [SEG].</s>" in long.text
    assert long.expressions == ["What keeps Food cold?"]
    short = build_reasonseg_prompt("Fridge", False)
    assert "USER: <im_start><image><im_end>\n What is Fridge in this image? Please output segmentation mask." in short.text
    assert short.questions == ["What is Fridge in this image? Please output segmentation mask."]


def test_prepare_data_lists_each_problem_in_one_line(tmp_path, capsys):
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "prepare_data.py"
    try:
        prepare_data = load_script(tool, "prepare_data_reasonseg")
        folder = generate_synthetic_reasonseg(tmp_path, {"val": 4})
        assert prepare_data.main([str(tmp_path), "--dataset", "reasonseg"]) == 0
        out = capsys.readouterr().out
        assert "found ReasonSeg val: 4 images, 2 short and 3 long queries" in out
        assert "ReasonSeg val holds 4 images; the release has 200" in out
        val = folder / "val"
        (val / "synthetic_val_0000.json").unlink()
        (val / "synthetic_val_0001.jpg").write_bytes(b"not a jpeg")
        raw = json.loads((val / "synthetic_val_0002.json").read_text())
        raw["shapes"][0]["points"][0] = [-5, 3]
        (val / "synthetic_val_0002.json").write_text(json.dumps(raw))
        raw = json.loads((val / "synthetic_val_0003.json").read_text())
        raw["shapes"][0]["points"] = [[1, 2], [3]]
        (val / "synthetic_val_0003.json").write_text(json.dumps(raw))
        (val / "extra.json").write_text("{}")
        assert prepare_data.main([str(folder), "--dataset", "reasonseg", "--split", "val", "--split", "test"]) == 1
        out = capsys.readouterr().out
        problems = [line for line in out.splitlines() if line.startswith("  - ")]
        assert len(problems) == 6, out
        assert "synthetic_val_0000.json: missing" in out and "synthetic_val_0001.jpg: unreadable" in out
        assert "synthetic_val_0002.json: shape 0 ('target') has points outside" in out
        assert "synthetic_val_0003.json: shape 0 ('target'): points are not numbers" in out
        assert "extra.json: no image extra.jpg beside it" in out and "but not 'test'" in out
        assert "found ReasonSeg val: 4 images" in out  # the rest of the split was still read
    finally:
        sys.modules.pop("prepare_data_reasonseg", None)


def test_reasonseg_without_a_folder_is_a_clear_error():
    from litelvlm.data.datamodule import ReferringDataModule

    with pytest.raises(DataError, match="ReasonSeg has no demo set: pass --data.data_dir"):
        ReferringDataModule(dataset="reasonseg").setup()
