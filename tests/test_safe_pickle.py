"""The containers-only unpickler: plain data loads, nothing that could run code does."""

from __future__ import annotations

import builtins
import collections
import copyreg
import os
import pickle
import struct

import pytest

from litelvlm.data.safe_pickle import UnsafePickleError, load_refs_pickle, safe_load, safe_loads

PLAIN = [
    {"ref_id": 3, "ann_id": [101, -1], "split": "val", "score": 0.5, "sentences": [{"sent": "a dog", "tokens": ["a", "dog"]}]},
    (1, 2), None, True, 10**30, -2.5e-8, "café",
]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_containers_and_scalars_load_in_every_protocol(protocol):
    assert safe_loads(pickle.dumps(PLAIN, protocol=protocol)) == PLAIN


def test_sets_and_bytes_load_where_the_protocol_has_opcodes_for_them():
    value = [{4, 5}, frozenset({6}), b"bytes"]
    assert safe_loads(pickle.dumps(value, protocol=4)) == value
    with pytest.raises(UnsafePickleError, match="builtin__.set"):  # protocol 2 spells a set as a call to set()
        safe_loads(pickle.dumps(value, protocol=2))


def test_python2_strings_are_decoded_as_text():
    # What Python 2 writes for [{'sent': 'caf\xc3\xa9'}] at protocol 2: SHORT_BINSTRING byte strings.
    data = b"\x80\x02]q\x00}q\x01U\x04sentq\x02U\x05caf\xc3\xa9q\x03sa."
    assert safe_loads(data) == [{"sent": "café"}]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("call", ["os.system", "builtins.exec"])
def test_a_pickle_that_would_call_a_function_is_refused_before_the_call(tmp_path, protocol, call):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            if call == "os.system":
                return (os.system, (f"touch {marker}",))
            return (builtins.exec, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "sentences": Payload()}], protocol=protocol))
    with pytest.raises(UnsafePickleError) as raised:
        safe_load(path)
    message = str(raised.value)
    assert str(path) in message
    assert (".system" in message) if call == "os.system" else (".exec" in message)  # __builtin__ below protocol 3
    assert not marker.exists()


def test_even_a_harmless_global_is_refused_with_its_name():
    data = pickle.dumps(collections.OrderedDict(a=1), protocol=2)
    with pytest.raises(UnsafePickleError, match=r"<bytes>: refused to load the global collections\.OrderedDict"):
        safe_loads(data)


def test_a_cached_copyreg_extension_code_cannot_bypass_the_check(tmp_path):
    code = 0x7FFFF0
    marker = tmp_path / "called"
    copyreg.add_extension("os", "getcwd", code)
    try:
        # EXT4 <code>, an empty tuple, REDUCE: calls os.getcwd(). A normal load primes the cache, after
        # which the C unpickler would hand the cached function out without asking find_class.
        data = b"\x80\x02\x84" + struct.pack("<i", code) + b")R."
        assert pickle.loads(data) == os.getcwd()
        with pytest.raises(UnsafePickleError, match=f"extension code {code}"):
            safe_loads(data)
    finally:
        copyreg.remove_extension("os", "getcwd", code)
    assert not marker.exists()


def test_a_persistent_id_is_refused():
    class WithPersistentId(pickle.Pickler):
        def persistent_id(self, obj):
            return "external" if obj == "x" else None

    import io

    buffer = io.BytesIO()
    WithPersistentId(buffer, protocol=2).dump(["x"])
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_loads(buffer.getvalue())


def test_a_truncated_file_is_an_unpickling_error_naming_the_file(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(PLAIN, protocol=2)[:20])
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p: not a readable pickle"):
        safe_load(path)


def test_load_refs_pickle_wants_a_list_of_dicts(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps({"ref_id": 1}, protocol=2))
    with pytest.raises(ValueError, match="holds a list of dicts, this one holds dict"):
        load_refs_pickle(path)
    path.write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2))
    assert load_refs_pickle(path) == [{"ref_id": 1}]
