"""The synthetic set: public schema, masks that match the pixels, sentences that are true, same bytes per seed."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from litelvlm.data import synthetic
from litelvlm.data.refcoco_parquet import ReferringImageDataset
from litelvlm.data.synthetic import QUESTION, SHAPE_COLOURS, ensure_demo_data, generate_synthetic_refcoco

NUM_IMAGES = 6
SPLIT_FILE = "data/val-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    return generate_synthetic_refcoco(tmp_path_factory.mktemp("synthetic"), num_images=NUM_IMAGES, seed=0)


@pytest.fixture(scope="module")
def dataset(synthetic_folder, tmp_path_factory):
    return ReferringImageDataset(
        synthetic_folder, "val", max_sentences=None, cache_dir=str(tmp_path_factory.mktemp("hf_cache"))
    )


def test_parquet_has_the_public_lmms_lab_refcoco_schema(synthetic_folder):
    schema = pq.read_schema(synthetic_folder / SPLIT_FILE)
    columns = ["question_id", "image", "question", "answer", "segmentation", "bbox", "iscrowd", "file_name"]
    assert schema.names == columns
    # Lists compare by value type: parquet writers name the list item "item" or "element".
    types = {
        field.name: f"list<{field.type.value_type}>" if pa.types.is_list(field.type) else str(field.type)
        for field in schema
    }
    assert types == {
        "question_id": "string",
        "image": "struct<bytes: binary, path: string>",
        "question": "string",
        "answer": "list<string>",
        "segmentation": "list<float>",
        "bbox": "list<float>",
        "iscrowd": "int8",
        "file_name": "string",
    }
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert features["answer"]["_type"] == "Sequence"


def test_datasets_reads_the_image_column_as_an_image_feature(synthetic_folder, tmp_path):
    import datasets

    rows = datasets.load_dataset(
        "parquet", data_files=str(synthetic_folder / SPLIT_FILE), split="train", cache_dir=str(tmp_path)
    )
    assert isinstance(rows.features["image"], datasets.Image)
    first = rows[0]
    assert first["image"].mode == "RGB"
    assert first["question"] == QUESTION
    assert 1 <= len(first["answer"]) <= 3
    assert len(first["bbox"]) == 4 and first["iscrowd"] == 0
    assert re.fullmatch(r"synthetic_val_\d{12}_\d\.jpg", first["file_name"])


def test_images_vary_in_size_and_are_not_square(dataset):
    sizes = [dataset.load_image(record).size for record in dataset.records]
    assert len(dataset) == NUM_IMAGES
    assert all(200 <= width <= 480 and 160 <= height <= 400 and width != height for width, height in sizes)
    assert len(set(sizes)) == NUM_IMAGES
    assert all(2 <= len(record.refs) <= 4 for record in dataset.records)


def _shrink(mask, steps):
    for _ in range(steps):
        inner = mask.copy()
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        mask = inner
    return mask


def _grow(mask, steps):
    return ~_shrink(~mask, steps)


def _observed_refs(dataset, index):
    """What the pixels and masks say each ref is: colour, kind, area, box; read without the generator."""
    sample = dataset[index]
    pixels = np.asarray(sample.image, dtype=np.float64)
    record = dataset.records[index]
    observed = {}
    for ref in record.refs:
        mask = sample.masks[sample.ref_ids.index(ref.ref_id)]
        mean_colour = pixels[_shrink(mask, 2)].mean(axis=0)
        colour = min(SHAPE_COLOURS, key=lambda name: np.linalg.norm(mean_colour - SHAPE_COLOURS[name]))
        x, y, width, height = ref.bbox
        fill = mask.sum() / (width * height)  # square 1, 32-gon circle 0.78, triangle 0.5
        fills = {"square": 1.0, "circle": 0.78, "triangle": 0.5}
        kind = min(fills, key=lambda name: abs(fills[name] - fill))
        observed[ref.ref_id] = dict(
            colour=colour, kind=kind, area=float(mask.sum()), box=(x, y, x + width, y + height),
            centre=(x + width / 2, y + height / 2), mask=mask, sentences=ref.sentences,
        )
    return sample, pixels, observed


def _polygon_area(polygon):
    xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


def test_masks_cover_exactly_the_drawn_shapes(dataset):
    for index in range(len(dataset)):
        sample, pixels, observed = _observed_refs(dataset, index)
        for ref in dataset.records[index].refs:
            shape = observed[ref.ref_id]
            colour = np.array(SHAPE_COLOURS[shape["colour"]], dtype=np.float64)
            # Pixel count of the decoded polygon matches its geometric area (squares exactly).
            polygon_area = _polygon_area(ref.segmentations[0])
            if shape["kind"] == "square":
                assert shape["area"] == polygon_area
            assert abs(shape["area"] - polygon_area) <= 0.03 * polygon_area + 2
            # Inside the mask the image has the shape's colour; just outside it does not.
            inside = np.linalg.norm(pixels[_shrink(shape["mask"], 1)] - colour, axis=1)
            ring = _grow(shape["mask"], 2) & ~_grow(shape["mask"], 1)
            outside = np.linalg.norm(pixels[ring] - colour, axis=1)
            assert np.mean(inside < 40) > 0.98, (sample.image_id, ref.ref_id)
            assert np.mean(outside < 40) < 0.05, (sample.image_id, ref.ref_id)


SENTENCE = re.compile(
    r"the (?:(?P<size>big|small) )?(?P<colour>\w+) (?P<kind>circle|square|triangle)"
    r"(?: (?P<relation>left of|right of|above|below)"
    r" the (?P<anchor_colour>\w+) (?P<anchor_kind>circle|square|triangle))?"
)


def _check_sentence(sentence, target, refs):
    others = [ref for ref in refs if ref is not target]
    named = lambda colour, kind: [ref for ref in refs if (ref["colour"], ref["kind"]) == (colour, kind)]  # noqa: E731
    if sentence == "the biggest shape":
        return all(target["area"] >= 1.4 * ref["area"] for ref in others)
    if sentence == "the smallest shape":
        return all(target["area"] * 1.4 <= ref["area"] for ref in others)
    extremes = {"leftmost": (0, -1), "rightmost": (0, 1), "top": (1, -1), "bottom": (1, 1)}
    if match := re.fullmatch(r"the (leftmost|rightmost|top|bottom) shape", sentence):
        axis, sign = extremes[match.group(1)]
        return all(sign * (target["centre"][axis] - ref["centre"][axis]) > 0 for ref in others)
    if match := re.fullmatch(r"the (circle|square|triangle)", sentence):
        return [ref for ref in refs if ref["kind"] == match.group(1)] == [target]
    if match := re.fullmatch(r"the (\w+) shape", sentence):
        return [ref for ref in refs if ref["colour"] == match.group(1)] == [target]
    match = SENTENCE.fullmatch(sentence)
    assert match, f"sentence outside the grammar: {sentence!r}"
    if (target["colour"], target["kind"]) != (match["colour"], match["kind"]):
        return False
    same = [ref for ref in named(match["colour"], match["kind"]) if ref is not target]
    if match["size"] == "big":
        return bool(same) and all(target["area"] >= 1.4 * ref["area"] for ref in same)
    if match["size"] == "small":
        return bool(same) and all(target["area"] * 1.4 <= ref["area"] for ref in same)
    if match["relation"]:
        anchors = named(match["anchor_colour"], match["anchor_kind"])
        if len(anchors) != 1:
            return False
        a, b = target["box"], anchors[0]["box"]
        return {"left of": a[2] < b[0], "right of": a[0] > b[2], "above": a[3] < b[1], "below": a[1] > b[3]}[
            match["relation"]
        ]
    return not same  # "the red circle" must be the only red circle


def test_every_sentence_is_true_of_what_the_image_shows(dataset):
    kinds_of_sentences = set()
    for index in range(len(dataset)):
        _, _, observed = _observed_refs(dataset, index)
        refs = list(observed.values())
        for ref in refs:
            assert 1 <= len(ref["sentences"]) <= 3
            for sentence in ref["sentences"]:
                assert _check_sentence(sentence, ref, refs), (dataset.records[index].image_id, sentence)
                has_relation = re.search(r" (left of|right of|above|below) the ", sentence)
                kinds_of_sentences.add("relation" if has_relation else "other")
    assert kinds_of_sentences == {"relation", "other"}


def test_same_seed_writes_identical_bytes(tmp_path):
    first = generate_synthetic_refcoco(tmp_path / "a", num_images=3, seed=7)
    second = generate_synthetic_refcoco(tmp_path / "b", num_images=3, seed=7)
    other_seed = generate_synthetic_refcoco(tmp_path / "c", num_images=3, seed=8)
    assert (first / SPLIT_FILE).read_bytes() == (second / SPLIT_FILE).read_bytes()
    assert (first / SPLIT_FILE).read_bytes() != (other_seed / SPLIT_FILE).read_bytes()


def test_image_i_does_not_depend_on_how_many_images_are_generated():
    assert synthetic.synthetic_image(3, 1)[0] == synthetic.synthetic_image(3, 1)[0]
    assert synthetic.synthetic_image(3, 1)[0] != synthetic.synthetic_image(3, 2)[0]


def test_demo_data_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "DEMO_SPLITS", tuple((split, seed, 2) for split, seed, _ in synthetic.DEMO_SPLITS))
    monkeypatch.setenv("LITELVLM_CACHE", str(tmp_path))
    folder = ensure_demo_data()
    assert folder == tmp_path / "synthetic_refcoco_v2"
    assert sorted(path.name for path in (folder / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
        "val-00000-of-00001.parquet",
    ]
    written = (folder / SPLIT_FILE).stat().st_mtime_ns
    assert ensure_demo_data() == folder
    assert (folder / SPLIT_FILE).stat().st_mtime_ns == written
    assert [path.name for path in tmp_path.iterdir()] == ["synthetic_refcoco_v2"]  # no staging left over
    explicit = ensure_demo_data(tmp_path / "elsewhere")
    assert explicit == tmp_path / "elsewhere" / "synthetic_refcoco_v2" and explicit.is_dir()
