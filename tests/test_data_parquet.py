"""The lmms-lab/RefCOCO parquet loader and the COCO mask decoding it relies on."""

import random
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as coco_mask

from litelvlm.data.masks import (
    MalformedSegmentationError,
    polygons_to_mask,
    ref_mask,
    rle_to_mask,
    segmentation_to_mask,
)
from litelvlm.data.refcoco_parquet import (
    CorruptImageError,
    ReferringImageDataset,
    choose_sentences,
    image_id_from_file_name,
)
from litelvlm.data.synthetic import PARQUET_SCHEMA, generate_synthetic_refcoco

SPLIT_FILE = "data/val-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    return generate_synthetic_refcoco(tmp_path_factory.mktemp("synthetic"), num_images=4, seed=0)


@pytest.fixture
def hf_cache(tmp_path):
    return str(tmp_path / "hf_cache")


def _write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: [row[name] for row in rows] for name in PARQUET_SCHEMA.names}
    pq.write_table(pa.Table.from_pydict(columns, schema=PARQUET_SCHEMA), path)


# --- grouping rows into images -------------------------------------------------------------------


def test_rows_are_grouped_into_images_in_order_of_first_appearance(synthetic_folder, hf_cache):
    rows = pq.read_table(synthetic_folder / SPLIT_FILE).to_pylist()
    dataset = ReferringImageDataset(synthetic_folder, "val", max_sentences=None, cache_dir=hf_cache)
    expected_order = list(dict.fromkeys(row["file_name"].rsplit("_", 1)[0] for row in rows))
    assert [record.image_id for record in dataset.records] == expected_order
    for record in dataset.records:
        own_rows = [row for row in rows if row["file_name"].startswith(record.image_id + "_")]
        assert [ref.ref_id for ref in record.refs] == [row["question_id"] for row in own_rows]
        assert [ref.sentences for ref in record.refs] == [row["answer"] for row in own_rows]
        assert record.refs[0].sentence_ids[0] == f"{own_rows[0]['question_id']}_0"


def test_all_sentences_of_an_image_are_pooled_each_with_its_refs_mask(synthetic_folder, hf_cache):
    dataset = ReferringImageDataset(synthetic_folder, "val", max_sentences=None, cache_dir=hf_cache)
    for index, record in enumerate(dataset.records):
        sample = dataset[index]
        assert sample.index == index and sample.image_id == record.image_id
        assert sample.sentences == [sentence for ref in record.refs for sentence in ref.sentences]
        height, width = sample.image.height, sample.image.width
        assert sample.masks.dtype == bool and sample.masks.shape == (len(sample.sentences), height, width)
        for mask, ref_id in zip(sample.masks, sample.ref_ids):
            ref = next(ref for ref in record.refs if ref.ref_id == ref_id)
            np.testing.assert_array_equal(mask, ref_mask(ref.segmentations, height, width))
            assert mask.any()


@pytest.mark.parametrize(
    "file_name, image_id",
    [
        ("COCO_train2014_000000296747_0.jpg", "COCO_train2014_000000296747"),
        ("COCO_train2014_000000296747_12.jpg", "COCO_train2014_000000296747"),
        ("COCO_train2014_000000296747.jpg", "COCO_train2014_000000296747"),
        ("photo.png", "photo"),
    ],
)
def test_image_id_strips_the_per_row_suffix_but_not_the_coco_number(file_name, image_id):
    assert image_id_from_file_name(file_name) == image_id


# --- seeded sentence sampling --------------------------------------------------------------------


def test_sentence_choice_is_seeded_bounded_and_without_repeats():
    for index in range(50):
        for pool_size in (1, 2, 3, 4, 7):
            chosen = choose_sentences(pool_size, 3, seed=0, index=index)
            assert chosen == choose_sentences(pool_size, 3, seed=0, index=index)
            assert len(chosen) == min(pool_size, 3) and len(set(chosen)) == len(chosen)
            assert all(0 <= position < pool_size for position in chosen)
    draws = {tuple(choose_sentences(7, 3, seed=0, index=index)) for index in range(20)}
    assert len(draws) > 10  # each index has its own generator
    other_seed = [choose_sentences(7, 3, seed=1, index=index) for index in range(5)]
    assert other_seed != [choose_sentences(7, 3, seed=0, index=index) for index in range(5)]
    assert choose_sentences(7, None, seed=0, index=3) == list(range(7))
    assert choose_sentences(7, 3, seed=0, index=5) == random.Random("litelvlm-sentences:0:5").sample(range(7), 3)


def test_dataset_items_repeat_exactly_and_respect_max_sentences(synthetic_folder, hf_cache):
    dataset = ReferringImageDataset(synthetic_folder, "val", max_sentences=2, seed=3, cache_dir=hf_cache)
    again = ReferringImageDataset(synthetic_folder, "val", max_sentences=2, seed=3, cache_dir=hf_cache)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample.sentence_ids == again[index].sentence_ids == dataset[index].sentence_ids
        assert len(sample.sentences) == min(2, dataset.records[index].num_sentences)
        assert len(set(sample.sentence_ids)) == len(sample.sentence_ids)
    with pytest.raises(ValueError, match="max_sentences"):
        ReferringImageDataset(synthetic_folder, "val", max_sentences=0, cache_dir=hf_cache)


# --- accepted layouts and clear errors -----------------------------------------------------------


def test_every_documented_folder_layout_loads(synthetic_folder, tmp_path, hf_cache):
    source = synthetic_folder / SPLIT_FILE
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(source, flat / "val-00000-of-00001.parquet")
    per_split = tmp_path / "per_split"
    (per_split / "val").mkdir(parents=True)
    shutil.copy(source, per_split / "val" / "part0.parquet")
    lengths = {
        len(ReferringImageDataset(location, "val", cache_dir=hf_cache))
        for location in (synthetic_folder, flat, per_split, source, str(flat))
    }
    assert lengths == {4}


def test_missing_folder_raises_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder.*does not exist"):
        ReferringImageDataset(missing, "val")


def test_missing_split_lists_the_layouts_looked_for(synthetic_folder):
    with pytest.raises(FileNotFoundError, match=r"split 'testB'.*testB-\*\.parquet.*data/val-00000-of-00001\.parquet"):
        ReferringImageDataset(synthetic_folder, "testB")


def test_unreachable_hub_id_says_how_to_place_the_files_locally(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"lmms-lab/RefCOCO.*no network.*DIR/data/testA-\*\.parquet"):
        ReferringImageDataset("lmms-lab/RefCOCO", "testA")


def test_corrupt_image_bytes_name_the_row_and_file(synthetic_folder, tmp_path, hf_cache):
    rows = pq.read_table(synthetic_folder / SPLIT_FILE).to_pylist()
    first_image = rows[0]["file_name"].rsplit("_", 1)[0]
    for row in rows:
        if row["file_name"].startswith(first_image):
            row["image"] = {"bytes": b"this is not a jpeg", "path": row["file_name"]}
    _write_rows(tmp_path / "broken" / "val-0.parquet", rows)
    dataset = ReferringImageDataset(tmp_path / "broken", "val", cache_dir=hf_cache)
    with pytest.raises(CorruptImageError, match=rf"row 0 \(file_name '{first_image}_0.jpg'\).*cannot be decoded"):
        dataset[0]
    assert dataset[1].image.mode == "RGB"


def test_missing_required_column_is_named(tmp_path, hf_cache):
    table = pa.table({"question_id": ["1"], "answer": [["a"]]})
    (tmp_path / "odd").mkdir()
    pq.write_table(table, tmp_path / "odd" / "val-0.parquet")
    with pytest.raises(ValueError, match=r"lacks the columns \['image', 'segmentation'\]"):
        ReferringImageDataset(tmp_path / "odd", "val", cache_dir=hf_cache)


def test_row_without_segmentation_is_a_no_target_ref_with_an_empty_mask(synthetic_folder, tmp_path, hf_cache):
    rows = pq.read_table(synthetic_folder / SPLIT_FILE).to_pylist()
    image_rows = [row for row in rows if row["file_name"].startswith(rows[0]["file_name"].rsplit("_", 1)[0])]
    image_rows[0]["segmentation"] = []
    _write_rows(tmp_path / "empty" / "val-0.parquet", image_rows)
    sample = ReferringImageDataset(tmp_path / "empty", "val", max_sentences=None, cache_dir=hf_cache)[0]
    empty_ref = image_rows[0]["question_id"]
    for mask, ref_id in zip(sample.masks, sample.ref_ids):
        assert mask.any() == (ref_id != empty_ref)


# --- polygon and RLE decoding against hand-made masks --------------------------------------------


def test_polygon_rasterises_the_pixels_whose_centres_it_contains():
    # pycocotools' pixel (x, y) spans [x, x+1) x [y, y+1): the box x 1..4, y 1..3 holds 3 x 2 pixels.
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 1:4] = True
    flat = [1, 1, 4, 1, 4, 3, 1, 3]
    np.testing.assert_array_equal(polygons_to_mask(flat, 5, 6), expected)
    np.testing.assert_array_equal(polygons_to_mask([flat], 5, 6), expected)
    np.testing.assert_array_equal(segmentation_to_mask(np.array(flat, dtype=np.float32), 5, 6), expected)


def test_several_polygons_and_several_annotations_give_their_union():
    left, right = [0, 0, 2, 0, 2, 2, 0, 2], [4, 2, 6, 2, 6, 4, 4, 4]
    expected = np.zeros((4, 6), dtype=bool)
    expected[0:2, 0:2] = True
    expected[2:4, 4:6] = True
    np.testing.assert_array_equal(polygons_to_mask([left, right], 4, 6), expected)
    np.testing.assert_array_equal(ref_mask([left, [right]], 4, 6), expected)
    np.testing.assert_array_equal(ref_mask([], 4, 6), np.zeros((4, 6), dtype=bool))


def test_rle_uncompressed_and_compressed_decode_to_the_hand_made_mask():
    # COCO RLE runs go down the columns (Fortran order), starting with a run of zeros.
    expected = np.zeros((3, 4), dtype=bool)
    expected[1, 1] = True
    expected[0:3, 3] = True
    uncompressed = {"size": [3, 4], "counts": [4, 1, 4, 3]}
    np.testing.assert_array_equal(rle_to_mask(uncompressed, 3, 4), expected)
    compressed = coco_mask.encode(np.asfortranarray(expected.astype(np.uint8)))
    np.testing.assert_array_equal(segmentation_to_mask(compressed, 3, 4), expected)
    as_text = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}
    np.testing.assert_array_equal(segmentation_to_mask(as_text, 3, 4), expected)
    union = ref_mask([uncompressed, [0, 0, 1, 0, 1, 1, 0, 1]], 3, 4)
    assert union.sum() == expected.sum() + 1 and union[0, 0]


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ([1, 1, 4, 1], "polygon 0 has 4 coordinates; pycocotools .* needs more than 4"),
        ([[1, 1], [1, 1, 4, 1, 4, 3]], "polygon 0 has 2 coordinates"),
        ([1, 1, 4, 1, 1e7, 3], "more than 16 image sizes outside the 6x5 .* image: 10000000.0"),
        ([[1, 1, 4, 1, 4, 3], "x"], "polygon 1 must be a flat list of numbers"),
        ([1, 1, 4, float("nan"), 4, 3], "non-finite"),
        ([], "empty polygon list"),
        ({"size": [9, 9], "counts": "abc"}, r"RLE size 9x9 .* does not match the image, 5x6"),
        ({"size": [5, 6], "counts": [1, 2]}, "counts sum to 3"),
        ({"counts": [30]}, "needs the keys 'size' and 'counts'"),
        ("polygon", "polygon list or an RLE dict"),
    ],
)
def test_malformed_segmentation_gets_a_clear_error(segmentation, message):
    with pytest.raises(MalformedSegmentationError, match=message):
        segmentation_to_mask(segmentation, 5, 6)
