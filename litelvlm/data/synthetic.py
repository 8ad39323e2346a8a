"""A small synthetic referring-segmentation set in the exact `lmms-lab/RefCOCO` parquet schema.

Images hold 2-4 coloured shapes (circle, square, triangle) on neutral backgrounds; every shape is
one ref with 1-3 sentences ("the red circle", "the big green triangle", "the red circle left of
the blue square"). A sentence is kept only if it is true of the geometry and picks out its shape
alone. Shapes do not overlap, so a ref's polygon is exactly the visible object.

Coordinates are COCO's: continuous, pixel (x, y) covers [x, x+1) x [y, y+1). Shapes are drawn
4x supersampled and box-filtered, so their pixels agree with the pycocotools raster of the polygons
(circles: a 32-vertex polygon around a true circle). Same seed, same bytes: all randomness comes
from numpy Generators seeded with (seed, image index), and nothing time-dependent is written.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from litelvlm.errors import DataError

DEMO_DATA_NAME = "synthetic_refcoco_v2"  # bump the suffix whenever the demo splits change
DEMO_NUM_IMAGES = 24
# (split, seed, number of images) written by ensure_demo_data; `train` feeds the fine-tuning demo.
DEMO_SPLITS = (("val", 0, DEMO_NUM_IMAGES), ("test", 1, DEMO_NUM_IMAGES), ("train", 2, 32))

# The public set's `question`: a fixed captioning instruction, not a referring expression.
QUESTION = "Please carefully observe the area circled in the image and come up with a caption for the area."
SHAPE_KINDS = ("circle", "square", "triangle")
SHAPE_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
}
# Neutral, low-saturation tones: far from every shape colour, so shapes stay recognisable.
BACKGROUND_COLOURS = ((236, 236, 230), (205, 205, 210), (225, 215, 195), (190, 205, 212), (70, 72, 78), (150, 150, 145))
CIRCLE_VERTICES = 32
SIZE_RATIO = 1.5  # "big", "small", "biggest", "smallest" need areas at least this far apart
EXTREME_MARGIN = 10.0  # "leftmost" etc. need centres at least this many pixels apart
SUPERSAMPLE = 4
JPEG_QUALITY = 92

# What the published parquet files declare (written by `datasets` 2.x, hence "Sequence"); every
# `datasets` release since reads it, and the arrow schema is the one the hub files have.
_HF_FEATURES = {
    "question_id": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "question": {"dtype": "string", "_type": "Value"},
    "answer": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
    "segmentation": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "Sequence"},
    "bbox": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "Sequence"},
    "iscrowd": {"dtype": "int8", "_type": "Value"},
    "file_name": {"dtype": "string", "_type": "Value"},
}
PARQUET_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("question", pa.string()),
        ("answer", pa.list_(pa.string())),
        ("segmentation", pa.list_(pa.float32())),
        ("bbox", pa.list_(pa.float32())),
        ("iscrowd", pa.int8()),
        ("file_name", pa.string()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": _HF_FEATURES}})},
)


@dataclass(frozen=True)
class SyntheticShape:
    """A shape centred at (cx, cy) whose box is (cx +- half, cy +- half), in COCO coordinates."""

    kind: str
    colour: str
    cx: float
    cy: float
    half: float

    def polygon(self) -> list[float]:
        """The annotation polygon, flat [x0, y0, x1, y1, ...]."""
        cx, cy, half = self.cx, self.cy, self.half
        if self.kind == "square":
            points = [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
        elif self.kind == "triangle":
            points = [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
        else:
            angles = [2 * math.pi * k / CIRCLE_VERTICES for k in range(CIRCLE_VERTICES)]
            points = [(cx + half * math.cos(angle), cy + half * math.sin(angle)) for angle in angles]
        return [round(value, 2) for point in points for value in point]

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.cx - self.half, self.cy - self.half, self.cx + self.half, self.cy + self.half)

    @property
    def area(self) -> float:
        coordinates = self.polygon()
        xs, ys = coordinates[0::2], coordinates[1::2]
        return 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


# Spatial relations between boxes, strict (the boxes are separated along that axis).
RELATIONS = {
    "left of": lambda a, b: a.box[2] < b.box[0],
    "right of": lambda a, b: a.box[0] > b.box[2],
    "above": lambda a, b: a.box[3] < b.box[1],
    "below": lambda a, b: a.box[1] > b.box[3],
}
# Extremes: the target's centre beats every other centre by EXTREME_MARGIN pixels.
EXTREMES = {
    "the leftmost shape": lambda t, o: t.cx + EXTREME_MARGIN < o.cx,
    "the rightmost shape": lambda t, o: t.cx > o.cx + EXTREME_MARGIN,
    "the top shape": lambda t, o: t.cy + EXTREME_MARGIN < o.cy,
    "the bottom shape": lambda t, o: t.cy > o.cy + EXTREME_MARGIN,
}


def _picks_only(target: SyntheticShape, shapes: list[SyntheticShape], predicate) -> bool:
    return [shape for shape in shapes if predicate(shape)] == [target]


def referring_sentences(target: SyntheticShape, shapes: list[SyntheticShape]) -> list[str]:
    """Every sentence of the generator's grammar that is true of `target` and of no other shape."""
    others = [shape for shape in shapes if shape is not target]
    same_name = [shape for shape in others if shape.name == target.name]
    sentences = []
    if not same_name:
        sentences.append(f"the {target.name}")
    if _picks_only(target, shapes, lambda s: s.kind == target.kind):
        sentences.append(f"the {target.kind}")
    if _picks_only(target, shapes, lambda s: s.colour == target.colour):
        sentences.append(f"the {target.colour} shape")
    if same_name and all(target.area >= SIZE_RATIO * shape.area for shape in same_name):
        sentences.append(f"the big {target.name}")
    if same_name and all(target.area * SIZE_RATIO <= shape.area for shape in same_name):
        sentences.append(f"the small {target.name}")
    if all(target.area >= SIZE_RATIO * shape.area for shape in others):
        sentences.append("the biggest shape")
    if all(target.area * SIZE_RATIO <= shape.area for shape in others):
        sentences.append("the smallest shape")
    for phrase, beats in EXTREMES.items():
        if all(beats(target, shape) for shape in others):
            sentences.append(phrase)
    for anchor in others:
        if any(shape.name == anchor.name for shape in shapes if shape is not anchor):
            continue  # the anchor itself must be unambiguous
        for relation, holds in RELATIONS.items():
            if holds(target, anchor) and not any(holds(shape, anchor) for shape in same_name):
                sentences.append(f"the {target.name} {relation} the {anchor.name}")
    return sentences


def _boxes_apart(a: SyntheticShape, b: SyntheticShape, gap: float = 6.0) -> bool:
    return (
        a.box[2] + gap <= b.box[0]
        or b.box[2] + gap <= a.box[0]
        or a.box[3] + gap <= b.box[1]
        or b.box[3] + gap <= a.box[1]
    )


def _place_shapes(rng: np.random.Generator, width: int, height: int) -> list[SyntheticShape] | None:
    """2-4 non-overlapping shapes; about a third repeat an earlier colour and kind at another size."""
    short_side = min(width, height)
    shapes: list[SyntheticShape] = []
    for index in range(int(rng.integers(2, 5))):
        if index > 0 and rng.random() < 0.35:
            model = shapes[int(rng.integers(len(shapes)))]
            kind, colour = model.kind, model.colour
            factor = 1.7 if rng.random() < 0.5 else 1 / 1.7
            half = float(np.clip(round(model.half * factor), 10, 0.22 * short_side))
        else:
            kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
            colour = list(SHAPE_COLOURS)[int(rng.integers(len(SHAPE_COLOURS)))]
            half = float(max(10, round(rng.uniform(0.07, 0.19) * short_side)))
        for _ in range(50):
            cx = float(rng.integers(math.ceil(half) + 2, width - math.ceil(half) - 1))
            cy = float(rng.integers(math.ceil(half) + 2, height - math.ceil(half) - 1))
            shape = SyntheticShape(kind, colour, cx, cy, half)
            if all(_boxes_apart(shape, placed) for placed in shapes):
                shapes.append(shape)
                break
        else:
            return None
    return shapes


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """float [H, W, 3]: a solid tone or a gradient between two, with light noise half the time."""
    first = np.array(BACKGROUND_COLOURS[int(rng.integers(len(BACKGROUND_COLOURS)))], dtype=np.float64)
    pixels = np.broadcast_to(first, (height, width, 3)).copy()
    if rng.random() < 0.5:
        second = np.array(BACKGROUND_COLOURS[int(rng.integers(len(BACKGROUND_COLOURS)))], dtype=np.float64)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        along = xs * math.cos(angle) + ys * math.sin(angle)
        along = (along - along.min()) / max(along.max() - along.min(), 1e-9)
        pixels = first * (1 - along[..., None]) + second * along[..., None]
    if rng.random() < 0.5:
        pixels = pixels + rng.normal(0.0, 5.0, size=pixels.shape)
    return np.clip(pixels, 0, 255)


def _coverage(shape: SyntheticShape, width: int, height: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, from a 4x supersampled PIL drawing."""
    scale = SUPERSAMPLE
    canvas = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(canvas)
    # A supersampled pixel j has its centre at (j + 0.5) / scale in COCO coordinates.
    to_canvas = lambda value: value * scale - 0.5  # noqa: E731
    if shape.kind == "circle":
        x0, y0, x1, y1 = shape.box
        draw.ellipse([to_canvas(x0), to_canvas(y0), to_canvas(x1), to_canvas(y1)], fill=255)
    else:
        coordinates = shape.polygon()
        draw.polygon([(to_canvas(x), to_canvas(y)) for x, y in zip(coordinates[0::2], coordinates[1::2])], fill=255)
    return np.asarray(canvas.reduce(scale), dtype=np.float64) / 255.0


def _render(rng: np.random.Generator, width: int, height: int, shapes: list[SyntheticShape]) -> bytes:
    pixels = _background(rng, width, height)
    for shape in shapes:
        alpha = _coverage(shape, width, height)[..., None]
        pixels = pixels * (1 - alpha) + np.array(SHAPE_COLOURS[shape.colour], dtype=np.float64) * alpha
    image = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def synthetic_image(seed: int, image_index: int) -> tuple[bytes, list[SyntheticShape], list[list[str]]]:
    """One image: its JPEG bytes, its shapes and each shape's chosen sentences (1-3)."""
    rng = np.random.default_rng([seed, image_index])
    width, height = int(rng.integers(200, 481)), int(rng.integers(160, 401))
    while width == height:
        height = int(rng.integers(160, 401))
    for _ in range(200):
        shapes = _place_shapes(rng, width, height)
        if shapes is None:
            continue
        candidates = [referring_sentences(shape, shapes) for shape in shapes]
        if all(candidates):
            break
    else:
        raise RuntimeError(f"could not lay out synthetic image {image_index} (seed {seed})")
    chosen = []
    for options in candidates:
        count = min(int(rng.integers(1, 4)), len(options))
        picks = sorted(rng.choice(len(options), size=count, replace=False).tolist())
        chosen.append([options[pick] for pick in picks])
    return _render(rng, width, height, shapes), shapes, chosen


def generate_synthetic_refcoco(out_dir: str | Path, num_images: int = 24, seed: int = 0, split: str = "val") -> Path:
    """Write `out_dir/data/<split>-00000-of-00001.parquet` (the hub layout) and return `out_dir`."""
    if num_images < 1:
        raise DataError(f"num_images must be >= 1, got {num_images}")
    columns = {name: [] for name in PARQUET_SCHEMA.names}
    for image_index in range(num_images):
        image_bytes, shapes, sentences = synthetic_image(seed, image_index)
        for ref_index, (shape, ref_sentences) in enumerate(zip(shapes, sentences)):
            file_name = f"synthetic_{split}_{image_index:012d}_{ref_index}.jpg"
            x0, y0, x1, y1 = shape.box
            columns["question_id"].append(str(100000 + 10 * image_index + ref_index))
            columns["image"].append({"bytes": image_bytes, "path": file_name})
            columns["question"].append(QUESTION)
            columns["answer"].append(ref_sentences)
            columns["segmentation"].append(shape.polygon())
            columns["bbox"].append([x0, y0, x1 - x0, y1 - y0])
            columns["iscrowd"].append(0)
            columns["file_name"].append(file_name)
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    target = out_dir / "data" / f"{split}-00000-of-00001.parquet"
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    pq.write_table(pa.Table.from_pydict(columns, schema=PARQUET_SCHEMA), partial)
    os.replace(partial, target)
    return out_dir


def ensure_demo_data(cache_dir: str | Path | None = None) -> Path:
    """The demo data folder `<root>/synthetic_refcoco_v2`, generated on first use; root is
    `cache_dir`, else `$LITELVLM_CACHE`, else ~/.cache/litelvlm.

    It is written to a temporary folder and renamed into place, so processes that race here (DDP
    ranks, parallel tests) each see either nothing or the complete set.
    """
    root = Path(cache_dir or os.environ.get("LITELVLM_CACHE") or Path.home() / ".cache" / "litelvlm").expanduser()
    final = root / DEMO_DATA_NAME
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{DEMO_DATA_NAME}.tmp-", dir=root))
    try:
        for split, seed, num_images in DEMO_SPLITS:
            generate_synthetic_refcoco(staging, num_images=num_images, seed=seed, split=split)
        staging.chmod(0o755)
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():  # lost a race: another process put its copy there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _reasonseg_annotation(shapes: list[SyntheticShape], sentences: list[list[str]], image_index: int) -> dict:
    """The JSON of one synthetic ReasonSeg image: the first shape is the target.

    Even images ask short queries ("red circle"), odd ones long sentences built from the target's
    referring sentences (1-3 queries). Every third image also has a small "ignore" square inside the
    target, every fourth labels its second shape "ignore", and every fifth carries a "flag" shape
    over the whole image, which the reader must drop.
    """
    target = shapes[0]
    is_sentence = image_index % 2 == 1
    if is_sentence:
        texts = [f"Find the object that one would call {sentence} here, and explain nothing." for sentence in sentences[0]]
    else:
        texts = [sentences[0][0].removeprefix("the ")]

    def points(polygon: list[float]) -> list[list[float]]:
        return [[polygon[i], polygon[i + 1]] for i in range(0, len(polygon), 2)]

    annotated = [{"label": "target", "points": points(target.polygon()), "shape_type": "polygon"}]
    if image_index % 3 == 0:
        quarter = target.half / 4
        inner = SyntheticShape("square", target.colour, target.cx, target.cy, quarter)
        annotated.append({"label": "ignore", "points": points(inner.polygon()), "shape_type": "polygon"})
    if image_index % 4 == 0 and len(shapes) > 1:
        annotated.append({"label": "ignore region", "points": points(shapes[1].polygon()), "shape_type": "polygon"})
    if image_index % 5 == 0:
        x0, y0, x1, y1 = shapes[0].box
        annotated.append({"label": "flag", "points": [[0, 0], [x1, 0], [x1, y1], [0, y1]], "shape_type": "polygon"})
    return {"text": texts, "is_sentence": is_sentence, "shapes": annotated}


def generate_synthetic_reasonseg(root: str | Path, splits: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write LISA's release layout, `root/reason_seg/ReasonSeg/<split>/NAME.jpg + NAME.json`, with
    real JPEGs of the synthetic shapes; `splits` maps split name to number of images (default val: 6,
    test: 4). Returns the `ReasonSeg` folder."""
    splits = splits or {"val": 6, "test": 4}
    folder = Path(root) / "reason_seg" / "ReasonSeg"
    for split_number, (split, num_images) in enumerate(splits.items()):
        if num_images < 1:
            raise DataError(f"split {split}: num_images must be >= 1, got {num_images}")
        (folder / split).mkdir(parents=True, exist_ok=True)
        for image_index in range(num_images):
            image_bytes, shapes, sentences = synthetic_image(seed + 100 * split_number, image_index)
            name = f"synthetic_{split}_{image_index:04d}"
            (folder / split / f"{name}.jpg").write_bytes(image_bytes)
            annotation = _reasonseg_annotation(shapes, sentences, image_index)
            (folder / split / f"{name}.json").write_text(json.dumps(annotation, indent=1))
    return folder
