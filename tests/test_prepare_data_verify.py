"""`tools/prepare_data.py --verify`: decode every image and mask, one line per bad file; without it,
the tool says it only checked that the files exist."""

from __future__ import annotations

import json
import os

from test_data_original import coco_name, write_original_layout
from test_prepare_data import prepare_data  # noqa: F401  (the fixture)


def test_without_verify_it_says_it_only_checked_existence(prepare_data, tmp_path, capsys):  # noqa: F811
    write_original_layout(tmp_path)
    assert prepare_data.main([str(tmp_path), "--dataset", "refcoco", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "complete: nothing is missing (checked that the files exist; --verify decodes every image and mask)" in out


def test_verify_decodes_every_image_and_mask_of_a_good_folder(prepare_data, tmp_path, capsys):  # noqa: F811
    write_original_layout(tmp_path)
    assert prepare_data.main([str(tmp_path), "--dataset", "refcoco", "--split", "val", "--split", "testA", "--verify"]) == 0
    captured = capsys.readouterr()
    # val: images 2 and 1 with refs 3, 4 and 1, 2; testA: image 3 with ref 5
    assert "verified: 3 images and 5 masks decode" in captured.out
    assert "decoding images and masks" in captured.err  # the progress bar


def test_verify_names_a_truncated_jpeg_and_a_malformed_mask_one_line_each(prepare_data, tmp_path, capsys):  # noqa: F811
    write_original_layout(tmp_path)
    image = tmp_path / "coco_2014" / "train2014" / coco_name(2)
    os.truncate(image, image.stat().st_size // 2)  # an interrupted copy: the header is still there
    instances_file = tmp_path / "Refer_Segm" / "refcoco" / "instances.json"
    instances = json.loads(instances_file.read_text())
    broken = next(ann for ann in instances["annotations"] if ann["id"] == 102)  # ref 2 of image 1
    broken["segmentation"] = [[1.0, 2.0, 3.0]]  # an odd number of coordinates
    instances_file.write_text(json.dumps(instances))
    assert prepare_data.main([str(tmp_path), "--dataset", "refcoco", "--split", "val"]) == 0  # existence only
    capsys.readouterr()
    assert prepare_data.main([str(tmp_path), "--dataset", "refcoco", "--split", "val", "--verify"]) == 1
    out = capsys.readouterr().out
    assert "UNREADABLE (2), one per line:" in out
    bad_lines = [line for line in out.splitlines() if line.startswith("  - ")]
    assert len(bad_lines) == 2, out
    assert bad_lines[0].startswith(f"  - {image}: ") and "cannot be decoded" in bad_lines[0]
    assert bad_lines[1].startswith(f"  - {instances_file} (ref 2, image {coco_name(1).removesuffix('.jpg')})")
