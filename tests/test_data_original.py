"""The RefCOCO-family loader for the original layout (refs pickles, instances.json, COCO images).

The fixture writes a tiny folder in the released formats: refs as a protocol-2 pickle of the
refer API's dicts, instances.json with a polygon, a compressed RLE, a multi-polygon annotation and
an uncompressed RLE, images as JPEGs with COCO names; gRefCOCO adds a two-annotation target, an
empty target and a list-of-RLEs segmentation. Expected masks are drawn by hand with slices.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from litelvlm.data.masks import MalformedSegmentationError
from litelvlm.data.records import choose_sentences
from litelvlm.data.refcoco_original import AnnotationError, OriginalReferringDataset
from litelvlm.data.refcoco_parquet import CorruptImageError, ReferringImageDataset
from litelvlm.data.safe_pickle import UnsafePickleError
from litelvlm.data.sources import open_referring_dataset
from litelvlm.data.synthetic import generate_synthetic_refcoco

IMAGE_SIZES = {1: (40, 30), 2: (32, 24), 3: (20, 16)}  # image id -> (width, height)


def coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def image_key(image_id: int) -> str:
    return Path(coco_name(image_id)).stem


def blank(image_id: int) -> np.ndarray:
    width, height = IMAGE_SIZES[image_id]
    return np.zeros((height, width), dtype=bool)


def drawn(image_id: int, *boxes: tuple[slice, slice]) -> np.ndarray:
    mask = blank(image_id)
    for rows, cols in boxes:
        mask[rows, cols] = True
    return mask


def rectangle(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = mask.flatten(order="F").astype(int)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# Hand-drawn targets. pycocotools' pixel (x, y) covers [x, x+1) x [y, y+1), so the polygon
# rectangle (4, 3)-(14, 11) is rows 3..10, columns 4..13.
EXPECTED = {
    101: drawn(1, (slice(3, 11), slice(4, 14))),
    102: drawn(1, (slice(20, 28), slice(25, 37))),
    201: drawn(2, (slice(2, 8), slice(2, 8)), (slice(10, 20), slice(20, 28))),
    202: drawn(2, (slice(5, 9), slice(12, 18))),
    203: drawn(2, (slice(0, 3), slice(0, 4)), (slice(20, 24), slice(28, 32))),
    204: drawn(2, (slice(3, 6), slice(10, 14))),  # fractional polygon: rows 2.5..5.5 -> 3..5
    301: drawn(3, (slice(1, 5), slice(1, 5))),
}


def annotation(ann_id: int, image_id: int, segmentation, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": iscrowd, "area": 1.0,
            "bbox": [0.0, 0.0, 1.0, 1.0], "segmentation": segmentation}


ANNOTATIONS = {
    101: annotation(101, 1, [rectangle(4, 3, 14, 11)]),
    102: annotation(102, 1, compressed_rle(EXPECTED[102]), iscrowd=1),
    201: annotation(201, 2, [rectangle(2, 2, 8, 8), rectangle(20, 10, 28, 20)]),
    202: annotation(202, 2, uncompressed_rle(EXPECTED[202])),
    203: annotation(203, 2, [compressed_rle(drawn(2, (slice(0, 3), slice(0, 4)))),
                             compressed_rle(drawn(2, (slice(20, 24), slice(28, 32))))]),
    204: annotation(204, 2, [[10.0, 2.5, 14.0, 2.5, 14.0, 5.5, 10.0, 5.5]]),
    301: annotation(301, 3, [rectangle(1, 1, 5, 5)]),
}


def sentence(text: str, sent_id: int) -> dict:
    return {"tokens": text.split(), "raw": text.capitalize() + ".", "sent_id": sent_id, "sent": text}


def ref(ref_id, ann_id, image_id, split, *sentences, **extra) -> dict:
    first = ann_id[0] if isinstance(ann_id, list) else ann_id
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
            "sentences": list(sentences), "sent_ids": [s["sent_id"] for s in sentences],
            "category_id": 1, "file_name": f"{image_key(image_id)}_{first}.jpg", **extra}


# File order puts image 2 first: records follow first appearance, not image ids.
REFCOCO_REFS = [
    ref(3, 201, 2, "val", sentence("two squares", 30), sentence("the pair of boxes", 31), sentence("both squares", 32)),
    ref(4, 202, 2, "val", sentence("the small bar", 40)),
    ref(1, 101, 1, "val", sentence("the left box", 10), sentence("box on the left", 11)),
    ref(6, 101, 1, "train", sentence("a train sentence", 60)),
    ref(2, 102, 1, "val", sentence("the right blob", 20)),
    ref(5, 301, 3, "testA", sentence("a small square", 50)),
]
GREFCOCO_REFS = [
    ref(7, [101, 102], 1, "val", sentence("both things", 70), no_target=False),
    ref(8, [-1], 1, "val", sentence("the purple elephant", 80), no_target=True),
    ref(9, [203], 2, "val", sentence("the corners", 90), no_target=False),
]


def write_image(path: Path, image_id: int) -> None:
    width, height = IMAGE_SIZES[image_id]
    pixels = np.random.default_rng(image_id).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=90)


def write_original_layout(root: Path, dataset: str = "refcoco", refs=None, ann_ids=None, refs_format: str = "p") -> Path:
    """ROOT/Refer_Segm/<dataset>/{refs file, instances.json} and ROOT/coco_2014/train2014/*.jpg."""
    refs = refs if refs is not None else (GREFCOCO_REFS if dataset == "grefcoco" else REFCOCO_REFS)
    ann_ids = ann_ids or sorted(ANNOTATIONS)
    dataset_dir = root / "Refer_Segm" / dataset
    dataset_dir.mkdir(parents=True, exist_ok=True)
    split_by = "umd" if dataset == "refcocog" else "unc"
    stem = f"grefs({split_by})" if dataset == "grefcoco" else f"refs({split_by})"
    if refs_format == "json":
        (dataset_dir / f"{stem}.json").write_text(json.dumps(refs))
    else:
        (dataset_dir / f"{stem}.p").write_bytes(pickle.dumps(refs, protocol=2))  # as the released files
    images = [{"id": image_id, "file_name": coco_name(image_id), "width": width, "height": height,
               "license": 1, "coco_url": "", "flickr_url": "", "date_captured": ""}
              for image_id, (width, height) in IMAGE_SIZES.items()]
    instances = {"images": images, "annotations": [ANNOTATIONS[ann_id] for ann_id in ann_ids],
                 "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}]}
    (dataset_dir / "instances.json").write_text(json.dumps(instances))
    for image_id in IMAGE_SIZES:
        target = root / "coco_2014" / "train2014" / coco_name(image_id)
        if not target.exists():
            write_image(target, image_id)
    return root


@pytest.fixture
def refcoco_root(tmp_path):
    return write_original_layout(tmp_path / "data")


def all_sentences(root, dataset="refcoco", split="val", **kwargs) -> OriginalReferringDataset:
    return OriginalReferringDataset(root, dataset, split, max_sentences=None, **kwargs)


# --- records, sentences, masks --------------------------------------------------------------------


def test_refs_of_the_split_become_image_records_in_order_of_first_appearance(refcoco_root):
    data = all_sentences(refcoco_root)
    assert [record.image_id for record in data.records] == [image_key(2), image_key(1)]
    assert [[ref.ref_id for ref in record.refs] for record in data.records] == [["3", "4"], ["1", "2"]]
    assert len(data) == 2 and data.skipped == []
    assert [record.image_id for record in all_sentences(refcoco_root, split="testA").records] == [image_key(3)]


def test_every_sentence_of_every_ref_is_pooled_with_its_sentence_id(refcoco_root):
    first, second = all_sentences(refcoco_root)[0], all_sentences(refcoco_root)[1]
    assert first.sentences == ["two squares", "the pair of boxes", "both squares", "the small bar"]
    assert first.sentence_ids == ["30", "31", "32", "40"]
    assert first.ref_ids == ["3", "3", "3", "4"]
    assert second.sentences == ["the left box", "box on the left", "the right blob"]
    assert second.image_id == image_key(1) and second.index == 1


def test_masks_are_the_hand_drawn_targets_for_polygon_rle_and_multi_polygon(refcoco_root):
    image2, image1 = all_sentences(refcoco_root)[0], all_sentences(refcoco_root)[1]
    for mask in image2.masks[:3]:  # two-polygon annotation
        np.testing.assert_array_equal(mask, EXPECTED[201])
    np.testing.assert_array_equal(image2.masks[3], EXPECTED[202])  # uncompressed RLE
    np.testing.assert_array_equal(image1.masks[0], EXPECTED[101])  # polygon
    np.testing.assert_array_equal(image1.masks[2], EXPECTED[102])  # compressed RLE
    assert image1.masks.shape == (3, 30, 40) and image1.masks.dtype == bool


def test_images_are_read_from_coco_train2014_by_their_instances_file_name(refcoco_root):
    sample = all_sentences(refcoco_root)[1]
    with Image.open(refcoco_root / "coco_2014" / "train2014" / coco_name(1)) as expected:
        np.testing.assert_array_equal(np.asarray(sample.image), np.asarray(expected.convert("RGB")))
    assert sample.image.mode == "RGB" and sample.image.size == IMAGE_SIZES[1]


def test_an_image_stored_sideways_with_an_exif_orientation_is_read_upright(refcoco_root):
    path = refcoco_root / "coco_2014" / "train2014" / coco_name(1)
    with Image.open(path) as original:
        upright = np.asarray(original.convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: stored turned anticlockwise, 30 x 40 (w x h)
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(path, format="JPEG", quality=100, exif=exif)
    sample = all_sentences(refcoco_root)[1]  # instances.json says 40 x 30: no size error
    assert sample.image.size == IMAGE_SIZES[1]
    assert np.abs(np.asarray(sample.image).astype(int) - upright).mean() < 8  # a wrong turn differs by ~85
    np.testing.assert_array_equal(sample.masks[0], EXPECTED[101])


def test_up_to_max_sentences_are_chosen_with_the_seed_the_same_way_every_time(refcoco_root):
    def chosen(seed):
        return OriginalReferringDataset(refcoco_root, "refcoco", "val", max_sentences=3, seed=seed)[0].sentences

    pool = ["two squares", "the pair of boxes", "both squares", "the small bar"]
    assert chosen(0) == chosen(0)
    assert chosen(0) == [pool[i] for i in choose_sentences(4, 3, 0, 0)]
    assert len(chosen(0)) == 3 and len(set(chosen(0))) == 3
    assert len({tuple(chosen(seed)) for seed in range(8)}) > 1  # the seed matters
    sample = OriginalReferringDataset(refcoco_root, "refcoco", "val", max_sentences=3, seed=0)[0]
    for text, mask in zip(sample.sentences, sample.masks):
        np.testing.assert_array_equal(mask, EXPECTED[202] if text == "the small bar" else EXPECTED[201])


@pytest.mark.parametrize("refs_format", ["json", "p"])
def test_grefcoco_union_target_empty_target_and_rle_list(tmp_path, refs_format):
    root = write_original_layout(tmp_path, "grefcoco", refs_format=refs_format)
    data = all_sentences(root, "grefcoco")
    assert data.refs_file.name == f"grefs(unc).{refs_format}"
    image1, image2 = data[0], data[1]
    assert image1.sentences == ["both things", "the purple elephant"]
    np.testing.assert_array_equal(image1.masks[0], EXPECTED[101] | EXPECTED[102])
    assert not image1.masks[1].any() and image1.masks[1].shape == (30, 40)
    np.testing.assert_array_equal(image2.masks[0], EXPECTED[203])


def test_grefcoco_pickle_is_preferred_over_json_like_the_reference_reader(tmp_path):
    root = write_original_layout(tmp_path, "grefcoco", refs_format="json")
    renamed = [dict(r, sentences=[sentence("from the pickle", 1)]) for r in GREFCOCO_REFS]
    (root / "Refer_Segm" / "grefcoco" / "grefs(unc).p").write_bytes(pickle.dumps(renamed, protocol=2))
    assert all_sentences(root, "grefcoco")[0].sentences[0] == "from the pickle"


def test_refcocog_reads_the_umd_refs_by_default(tmp_path):
    root = write_original_layout(tmp_path, "refcocog")
    data = all_sentences(root, "refcocog")
    assert data.refs_file.name == "refs(umd).p" and len(data) == 2


# --- bad input: clear errors by default ---------------------------------------------------------


def test_a_missing_image_names_the_file_the_image_and_its_refs(refcoco_root):
    missing = refcoco_root / "coco_2014" / "train2014" / coco_name(1)
    missing.unlink()
    with pytest.raises(FileNotFoundError) as raised:
        all_sentences(refcoco_root)
    message = str(raised.value)
    assert str(missing) in message and image_key(1) in message and "refs 1, 2" in message


def test_an_image_deleted_after_indexing_names_the_sample(refcoco_root):
    data = all_sentences(refcoco_root)
    (refcoco_root / "coco_2014" / "train2014" / coco_name(2)).unlink()
    with pytest.raises(FileNotFoundError, match=r"sample 0 of refcoco .*COCO_train2014_000000000002\.jpg does not exist"):
        data[0]


def test_an_unreadable_image_names_the_sample_and_the_file(refcoco_root):
    (refcoco_root / "coco_2014" / "train2014" / coco_name(1)).write_bytes(b"not a jpeg")
    data = all_sentences(refcoco_root)
    with pytest.raises(CorruptImageError, match=r"sample 1 of refcoco .*COCO_train2014_000000000001\.jpg cannot be decoded"):
        data[1]
    assert data[0].image_id == image_key(2)  # the other samples still load


def test_an_image_whose_size_disagrees_with_instances_is_refused(refcoco_root):
    Image.new("RGB", (30, 40)).save(refcoco_root / "coco_2014" / "train2014" / coco_name(1), format="JPEG")
    with pytest.raises(CorruptImageError, match="is 30x40 .* says 40x30"):
        all_sentences(refcoco_root)[1]


def test_an_annotation_without_segmentation_names_the_ref_and_the_annotation(tmp_path, monkeypatch):
    monkeypatch.setitem(ANNOTATIONS, 202, {k: v for k, v in ANNOTATIONS[202].items() if k != "segmentation"})
    root = write_original_layout(tmp_path)
    with pytest.raises(AnnotationError, match=r"ref 4 of image COCO_train2014_000000000002 .*annotation 202 has no segmentation"):
        all_sentences(root)


def test_an_empty_segmentation_list_adds_nothing_to_the_mask_as_in_the_references(tmp_path, monkeypatch):
    intact = all_sentences(write_original_layout(tmp_path / "intact"))
    monkeypatch.setitem(ANNOTATIONS, 202, dict(ANNOTATIONS[202], segmentation=[]))
    emptied = all_sentences(write_original_layout(tmp_path / "emptied"))
    assert len(emptied) == len(intact)
    shrunk = 0
    for before, after in zip(intact, emptied):
        assert after.masks.shape == before.masks.shape
        assert not (after.masks & ~before.masks).any()  # nothing is added
        shrunk += int(after.masks.sum() < before.masks.sum())
    assert shrunk == 1  # only ref 4 (annotation 202) lost pixels


def test_an_empty_sentence_list_names_the_ref(tmp_path):
    refs = [dict(r, sentences=[]) if r["ref_id"] == 2 else r for r in REFCOCO_REFS]
    root = write_original_layout(tmp_path, refs=refs)
    with pytest.raises(AnnotationError, match="ref 2 of image COCO_train2014_000000000001 .*sentence list is empty"):
        all_sentences(root)


def test_a_ref_pointing_to_an_unknown_annotation_is_an_error(tmp_path):
    root = write_original_layout(tmp_path, ann_ids=[101, 102, 201, 301])
    with pytest.raises(AnnotationError, match="ref 4 .*annotation 202 is not in instances.json"):
        all_sentences(root)


def test_a_malformed_segmentation_names_the_ref_at_load_time(tmp_path, monkeypatch):
    monkeypatch.setitem(ANNOTATIONS, 101, dict(ANNOTATIONS[101], segmentation=[[1.0, 2.0, 3.0]]))
    data = all_sentences(write_original_layout(tmp_path))
    with pytest.raises(MalformedSegmentationError, match="sample 1 .*ref 1 of image COCO_train2014_000000000001"):
        data[1]


def test_a_split_that_is_not_in_the_refs_file_lists_the_splits_that_are(refcoco_root):
    with pytest.raises(ValueError, match=r"no ref in split 'testB'; its splits: \['testA', 'train', 'val'\]"):
        all_sentences(refcoco_root, split="testB")


def test_a_malicious_refs_pickle_is_refused_and_never_runs(tmp_path):
    root = write_original_layout(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    refs_file = root / "Refer_Segm" / "refcoco" / "refs(unc).p"
    refs_file.write_bytes(pickle.dumps([dict(REFCOCO_REFS[0], sentences=Payload())], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p: refused to load the global (posix|nt|os)\.system"):
        all_sentences(root)
    assert not marker.exists()


# --- skip mode --------------------------------------------------------------------------------------


def test_skip_mode_records_every_left_out_ref_and_image_and_keeps_the_rest(tmp_path, monkeypatch):
    monkeypatch.setitem(ANNOTATIONS, 202, dict(ANNOTATIONS[202], segmentation=None))
    refs = [dict(r, sentences=[]) if r["ref_id"] == 2 else r for r in REFCOCO_REFS]
    refs.append(ref(12, 301, 3, "val", sentence("on a missing image", 120)))
    root = write_original_layout(tmp_path, refs=refs)
    (root / "coco_2014" / "train2014" / coco_name(3)).unlink()
    data = OriginalReferringDataset(root, "refcoco", "val", max_sentences=None, on_error="skip")
    skipped = {(item.ref_id, item.image_id): item for item in data.skipped}
    assert set(skipped) == {("4", image_key(2)), ("2", image_key(1)), (None, image_key(3))}
    assert "annotation 202 has no segmentation" in skipped["4", image_key(2)].reason
    assert "sentence list is empty" in skipped["2", image_key(1)].reason
    assert skipped[None, image_key(3)].file.endswith(coco_name(3))
    assert all(item.stage == "index" and item.index is None for item in data.skipped)
    assert [[r.ref_id for r in record.refs] for record in data.records] == [["3"], ["1"]]
    assert data[0].sentences == ["two squares", "the pair of boxes", "both squares"]


def test_skip_mode_returns_none_for_an_unreadable_image_and_records_the_sample(refcoco_root):
    (refcoco_root / "coco_2014" / "train2014" / coco_name(1)).write_bytes(b"\xff\xd8 truncated")
    data = OriginalReferringDataset(refcoco_root, "refcoco", "val", on_error="skip")
    assert len(data) == 2 and data.skipped == []
    assert data[1] is None
    assert data[0] is not None
    [item] = data.skipped
    assert (item.stage, item.index, item.image_id) == ("load", 1, image_key(1))
    assert "cannot be decoded" in item.reason and item.as_dict()["file"].endswith(coco_name(1))


def test_skip_mode_that_would_leave_nothing_is_an_error(refcoco_root):
    for image_id in (1, 2):
        (refcoco_root / "coco_2014" / "train2014" / coco_name(image_id)).unlink()
    with pytest.raises(ValueError, match="every image was skipped"):
        OriginalReferringDataset(refcoco_root, "refcoco", "val", on_error="skip")


# --- choosing the loader by the source ------------------------------------------------------------


def test_open_referring_dataset_reads_the_original_layout(refcoco_root):
    data = open_referring_dataset(refcoco_root, "refcoco", split="val", max_sentences=None)
    assert isinstance(data, OriginalReferringDataset)
    assert data[1].sentences == all_sentences(refcoco_root)[1].sentences


def test_open_referring_dataset_reads_parquet_folders(tmp_path):
    folder = generate_synthetic_refcoco(tmp_path / "parquet", num_images=2, seed=0)
    data = open_referring_dataset(folder, split="val", cache_dir=str(tmp_path / "hf"))
    assert isinstance(data, ReferringImageDataset) and len(data) == 2


def test_open_referring_dataset_asks_for_the_data_set_name(refcoco_root):
    with pytest.raises(ValueError, match=r"name the data set .*present here: \['refcoco'\]"):
        open_referring_dataset(refcoco_root)


def test_open_referring_dataset_says_what_it_looked_for(tmp_path):
    (tmp_path / "refcoco").mkdir()
    with pytest.raises(FileNotFoundError, match="matches no known data layout: looked for .*Refer_Segm.*parquet") as raised:
        open_referring_dataset(tmp_path, "refcoco")
    assert "contains Refer_Segm/" in str(raised.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_referring_dataset(tmp_path / "nowhere")


def test_skip_mode_is_refused_for_parquet_sources(tmp_path):
    folder = generate_synthetic_refcoco(tmp_path / "parquet", num_images=1, seed=0)
    with pytest.raises(ValueError, match="original layout only"):
        open_referring_dataset(folder, on_error="skip")
