"""One way in for evaluation data: pick the loader from what the source is.

  a folder holding Refer_Segm/            the original layout (refs files, instances.json, COCO images)
  a folder of parquet files, a .parquet   the lmms-lab/RefCOCO schema, through `datasets`
  owner/name (not a local path)           the same schema from the hub
  dataset "reasonseg"                     LISA's ReasonSeg folder (ReasonSeg/, reason_seg/ or the root)
"""

from __future__ import annotations

from pathlib import Path

from litelvlm.errors import DataError
from litelvlm.data.records import ReferringRecordDataset
from litelvlm.data.refcoco_original import (
    DATASETS,
    ON_ERROR_MODES,
    REFER_SEGM,
    OriginalReferringDataset,
)
from litelvlm.data.refcoco_parquet import ReferringImageDataset, _is_hub_id
from litelvlm.data.reasonseg import DATASET_NAME as REASONSEG, ReasonSegDataset, is_reasonseg_layout


def default_protocol(dataset: str | None) -> str:
    """The reference evaluation of a data set: LISA's for ReasonSeg, GLaMM's for the RefCOCO family."""
    return "lisa-reasonseg" if dataset == REASONSEG else "glamm"


def is_original_layout(path: Path) -> bool:
    return (path / REFER_SEGM).is_dir()


def open_referring_dataset(
    source: str | Path,
    dataset: str | None = None,
    split: str = "val",
    split_by: str | None = None,
    max_sentences: int | None = 3,
    seed: int = 0,
    on_error: str = "raise",
    cache_dir: str | None = None,
    protocol: str | None = None,
) -> ReferringRecordDataset:
    """The split of `source` as a data set whose item i is image i's sample.

    `dataset` (refcoco, refcoco+, refcocog, grefcoco) and `split_by` choose inside an original-layout
    folder; a parquet source holds one data set already and needs neither. `on_error="skip"` is
    for the original layout (the parquet loader always raises on a bad sample). `protocol` says
    how sentences become items (see `litelvlm.data.records.protocol_items`); None: the data set's own.
    """
    if on_error not in ON_ERROR_MODES:
        raise DataError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}")
    protocol = protocol or default_protocol(dataset)
    if dataset == REASONSEG:
        return ReasonSegDataset(source, split=split, protocol=protocol, on_error=on_error)
    if protocol == "lisa-reasonseg":
        raise DataError(f"protocol lisa-reasonseg is ReasonSeg's (--data.dataset {REASONSEG}), not {dataset or 'this data set'}'s")
    if isinstance(source, str) and _is_hub_id(source):
        return _parquet(source, split, max_sentences, seed, on_error, cache_dir, protocol)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist (nor is it a hub id of the form owner/name)")
    if path.is_dir() and is_original_layout(path):
        if dataset is None:
            present = sorted(child.name for child in (path / REFER_SEGM).iterdir() if child.name in DATASETS)
            raise DataError(
                f"{path} holds the original layout ({REFER_SEGM}/): name the data set to read with "
                f"dataset=..., one of {list(DATASETS)}; present here: {present or 'none'}"
            )
        return OriginalReferringDataset(path, dataset, split, split_by, max_sentences, seed, on_error, protocol)
    if (path.is_file() and path.suffix == ".parquet") or (path.is_dir() and any(path.rglob("*.parquet"))):
        return _parquet(path, split, max_sentences, seed, on_error, cache_dir, protocol)
    hint = ""
    if is_reasonseg_layout(path):
        hint = f" It holds ReasonSeg: pass dataset={REASONSEG!r} (--data.dataset {REASONSEG})."
    elif path.name == REFER_SEGM or (path / "refcoco").is_dir() or (path / "instances.json").is_file():
        hint = f" It looks like the inside of the original layout: pass the folder that contains {REFER_SEGM}/."
    raise FileNotFoundError(
        f"{path} matches no known data layout: looked for {path / REFER_SEGM}/ (the original layout: "
        f"{REFER_SEGM}/<dataset>/refs(unc).p + instances.json, coco_2014/train2014/) and for parquet "
        f"files ({split}-*.parquet, data/{split}-*.parquet, {split}/*.parquet, or a .parquet file).{hint} "
        f"`python tools/prepare_data.py {path}` lists what the original layout needs."
    )


def _parquet(source, split, max_sentences, seed, on_error, cache_dir, protocol) -> ReferringImageDataset:
    if on_error != "raise":
        raise DataError(
            f"on_error={on_error!r} is supported for the original layout only; the parquet loader "
            f"raises on a bad sample of {source}"
        )
    return ReferringImageDataset(
        source, split=split, max_sentences=max_sentences, seed=seed, cache_dir=cache_dir, protocol=protocol
    )
