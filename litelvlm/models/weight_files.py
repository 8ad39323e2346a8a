"""Checkpoint files: a folder or hub id, and the weight files in it (sharded or single, safetensors or .bin).

Which layouts are read (safetensors preferred), how a shard index maps keys to files, and reading
a file's tensors one at a time (headers only, for shapes). Nothing here knows what the keys mean:
that is `key_plan.py`.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import safetensors
import torch
from torch import Tensor

from litelvlm.errors import LitelvlmError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
CHECKPOINT_METADATA = ["*.json", "*.model", "*.txt"]
MAX_LISTED_KEYS = 40


class CheckpointError(LitelvlmError):
    """A checkpoint whose files do not fit what the loader expects; the message names what."""


def listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" ... and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else "")


# ---------------------------------------------------------------- folders and hub ids
def snapshot(repo_id: str, patterns: list[str], what: str, cache_dir, local_files_only) -> Path:
    """The files of a hub repository that match `patterns`, fetched or found in the hub cache."""
    offline = huggingface_hub.constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=offline
        )
        return Path(folder)
    except Exception as error:  # offline cache miss, unknown repo, no network, gated repo
        cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{what} '{repo_id}' is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Where the hub is "
            f"reachable, `hf download {repo_id} --local-dir DIR` fetches it; then pass DIR instead of the id, "
            f"or keep the hub id and let the files sit in the hub cache ({cache})."
        ) from None


def resolve_folder(
    name_or_path: str | Path, what: str, patterns: list[str], cache_dir=None, local_files_only=None
) -> Path:
    """A local folder as is; otherwise a hub id, fetched (or, offline, found in the cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{what} {path} is a file; give the folder that holds it")
    name = str(name_or_path)
    if not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"{what} '{name}' not found: it is neither a folder nor a hub id (owner/name)")
    return snapshot(name, patterns, what, cache_dir, local_files_only)


# ---------------------------------------------------------------- weight files
# What reading a damaged file raises: safetensors' own error; torch.load's RuntimeError (a zip
# without its central directory), EOFError or UnpicklingError (a legacy pickle cut short).
READ_ERRORS = (safetensors.SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError)


@contextlib.contextmanager
def named_if_damaged(path: Path, fmt: str) -> Iterator[None]:
    """A weight file that cannot be read: one line naming it and what is wrong with it, not a
    library traceback that names no file (a 7B checkpoint has several shards to choose from)."""
    try:
        yield
    except READ_ERRORS as error:
        problem = safetensors_damage(path) if fmt == "safetensors" else zip_damage(path)
        if problem is None:  # not a damage we can tell: the library's own first sentence
            said = str(error).split(". ")[0].strip() or type(error).__name__
            if isinstance(error, OSError):  # permissions and the like: fetching again would not help
                raise CheckpointError(f"weight file {path} cannot be read ({said})") from error
            problem = f"is damaged or incomplete ({said})"
        raise CheckpointError(f"weight file {path} {problem}; fetch it again") from error


def zip_damage(path: Path) -> str | None:
    """What is wrong with a `.bin` file (a zip archive since torch 1.6, legacy pickles aside) that
    torch.load refused, if its size or zip structure tells; None otherwise."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with path.open("rb") as handle:
        is_zip = handle.read(2) == b"PK"
    if is_zip and not zipfile.is_zipfile(path):
        return f"is truncated or damaged: a {size}-byte zip archive without its end (the central directory)"
    return None


def safetensors_damage(path: Path) -> str | None:
    """What is wrong with a safetensors file, from its size and its header: an 8-byte little-endian
    header length, a JSON header giving each tensor's byte range, then the data. None if it looks whole."""
    size = path.stat().st_size
    if size < 8:
        return f"is {size} bytes, too short to hold a safetensors header"
    with path.open("rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if 8 + header_length > size:
            return f"is truncated: {size} bytes, shorter than its {header_length}-byte header"
        try:
            header = json.loads(handle.read(header_length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return "has a damaged header"
    expected = 8 + header_length + int(end)
    if size < expected:
        return f"is truncated: {size} bytes, its header describes {expected}"
    if size > expected:
        return f"is {size} bytes, {size - expected} more than its header describes"
    return None


@dataclass
class WeightFiles:
    """The weight files of a checkpoint, in one format, and which key lives in which file."""

    format: str  # "safetensors" or "bin"
    files: list[Path]

    def shapes(self) -> dict[str, Tensor]:
        """Every key with a meta tensor of its shape and dtype: the file headers only, no data."""
        shapes: dict[str, Tensor] = {}
        for path in self.files:
            for key, tensor in self._meta(path).items():
                if key in shapes:
                    raise CheckpointError(f"key '{key}' is stored twice (again in {path.name})")
                shapes[key] = tensor
        return shapes

    def _meta(self, path: Path) -> dict[str, Tensor]:
        with named_if_damaged(path, self.format):
            return self._read_meta(path)

    def _read_meta(self, path: Path) -> dict[str, Tensor]:
        if self.format == "safetensors":
            dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
            with safetensors.safe_open(str(path), framework="pt") as handle:
                metas = {}
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    metas[key] = torch.empty(piece.get_shape(), dtype=dtypes.get(piece.get_dtype()), device="meta")
                return metas
        return torch.load(path, map_location="meta", weights_only=True)

    def read(self, path: Path) -> Iterator[tuple[str, Tensor]]:
        """The tensors of one file, one at a time (safetensors lazily, `.bin` memory-mapped when possible)."""
        with named_if_damaged(path, self.format):
            yield from self._read(path)

    def _read(self, path: Path) -> Iterator[tuple[str, Tensor]]:
        if self.format == "safetensors":
            with safetensors.safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        yield from state.items()


def read_weight_map(index: Path) -> dict[str, str]:
    """key -> shard file name, from a shard index."""
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map")
    return weight_map


# (format, shard index, single file), in order of preference: safetensors first when both are there.
WEIGHT_LAYOUTS = (
    ("safetensors", "model.safetensors.index.json", "model.safetensors"),
    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def shard_files(folder: Path, names, index: Path) -> list[Path]:
    """The shards an index names, checked to be there."""
    files = [folder / name for name in sorted(set(names))]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: shards listed in {index.name} are missing: {', '.join(missing)}")
    return files


def check_keys_agree(listed: set[str], found: set[str], index: Path) -> None:
    if listed != found:
        raise CheckpointError(f"{index.name} and the shards disagree on the keys: {listing(sorted(listed ^ found))}")


def find_weight_files(folder: Path) -> WeightFiles:
    """Sharded (with an index) or single-file weights; safetensors preferred when both are there."""
    found = weight_layout(folder)
    if found is None:
        raise CheckpointError(
            f"{folder} holds no weights: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
        )
    fmt, index, single = found
    if index is not None:
        return WeightFiles(fmt, shard_files(folder, read_weight_map(index).values(), index))
    return WeightFiles(fmt, [single])


def weight_layout(folder: Path) -> tuple[str, Path | None, Path | None] | None:
    """(format, shard index or None, single file or None) of the weights in `folder`; None if none."""
    for fmt, index_name, single in WEIGHT_LAYOUTS:
        if (folder / index_name).is_file():
            return fmt, folder / index_name, None
        if (folder / single).is_file():
            return fmt, None, folder / single
    return None


def check_index(weights: WeightFiles, keys: set[str], folder: Path) -> None:
    index = folder / next(index_name for fmt, index_name, _ in WEIGHT_LAYOUTS if fmt == weights.format)
    if not index.is_file():
        return
    check_keys_agree(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]), keys, index)



def fetch_weights(repo_id: str, folder: Path, cache_dir, local_files_only) -> WeightFiles:
    """For a hub id: fetch only the weight format the index files (already fetched) announce."""
    if (folder / "model.safetensors.index.json").is_file():
        patterns = ["*.safetensors"]
    elif (folder / "pytorch_model.bin.index.json").is_file():
        patterns = ["*.bin"]
    else:
        patterns = ["model.safetensors", "pytorch_model.bin"]
    folder = snapshot(repo_id, CHECKPOINT_METADATA + patterns, "model checkpoint", cache_dir, local_files_only)
    return find_weight_files(folder)
