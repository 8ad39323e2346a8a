"""Read the refs pickles (`refs(unc).p`, ...) without letting them run code.

A pickle can name any importable callable and have the loader call it (`os.system`, `eval`, ...),
so `pickle.load` on a file from the internet runs whatever its author chose. The refs files are
lists of dicts of strings, numbers and lists: they need no global at all. The unpickler here
refuses every global (and every persistent id), so only plain containers and scalars can load and
no callable is ever looked up, let alone called.

One path skips `find_class`: the copyreg extension codes (EXT1/EXT2/EXT4) return a cached object
once any unpickler in the process has resolved that code. Codes exist only where some code called
`copyreg.add_extension` (nothing in this project does); when any are registered, the opcodes are
scanned first and an extension code is refused.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

from litelvlm.errors import DataError


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something other than plain containers and scalars."""


class ContainersOnlyUnpickler(pickle.Unpickler):
    """Loads lists, dicts, tuples, sets, str, bytes, numbers, bools and None; refuses the rest.

    Every way a pickle reaches code (GLOBAL, STACK_GLOBAL, INST, uncached extension codes: all go
    through `find_class`) ends in `UnsafePickleError` before anything is imported. Use `safe_loads`
    or `safe_load`, which also close the cached-extension-code path.
    """

    def __init__(self, file, source: str = "<pickle>", encoding: str = "utf-8"):
        # Python 2 pickles (the released refs files) store `str` as bytes; decode them as text.
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(
            f"{self.source}: refused to load the global {module}.{name}; only plain containers and "
            f"scalars (list, dict, tuple, str, int, float, ...) are allowed. A refs file never needs "
            f"a global, so this file is not a genuine refs file, or it was tampered with."
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refused a persistent id ({pid!r}); plain data needs none")


_EXTENSION_OPCODES = ("EXT1", "EXT2", "EXT4")


def _refuse_extension_codes(data: bytes, source: str) -> None:
    """Refuse extension-code opcodes while copyreg has codes registered (see the module docstring)."""
    if not copyreg._inverted_registry:  # nothing registered: an extension opcode simply fails to load
        return
    for opcode, argument, position in pickletools.genops(data):
        if opcode.name in _EXTENSION_OPCODES:
            raise UnsafePickleError(
                f"{source}: refused the copyreg extension code {argument} at byte {position}; "
                f"plain data needs none"
            )


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle bytes that may hold only plain containers and scalars."""
    try:
        _refuse_extension_codes(data, source)
        return ContainersOnlyUnpickler(io.BytesIO(data), source=source).load()
    except UnsafePickleError:
        raise
    except UnicodeDecodeError as error:
        raise pickle.UnpicklingError(f"{source}: a Python 2 string is not valid UTF-8 ({error})") from error
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError) as error:
        raise pickle.UnpicklingError(f"{source}: not a readable pickle ({type(error).__name__}: {error})") from error


def safe_load(path: str | Path) -> Any:
    """Unpickle a file that may hold only plain containers and scalars."""
    path = Path(path)
    return safe_loads(path.read_bytes(), source=str(path))


def load_refs_pickle(path: str | Path) -> list[dict]:
    """A refs file of the refer API: a list of dicts (ref_id, ann_id, image_id, split, sentences, ...)."""
    refs = safe_load(path)
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        kind = type(refs).__name__ if not isinstance(refs, list) else "a list holding non-dicts"
        raise DataError(f"{path}: a refs file holds a list of dicts, this one holds {kind}")
    return refs
