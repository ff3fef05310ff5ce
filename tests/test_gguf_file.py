"""pocketlm's GGUF reader parses array fields in bulk; it must read exactly what gguf-py reads."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from pocketlm.errors import PocketError
from pocketlm.models.gguf_file import FastGGUFReader, open_gguf

V = gguf.GGUFValueType


def _write_every_kind(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 7)
    w.add_int32("t.i32", -5)
    w.add_float32("t.f32", 1.5)
    w.add_float64("t.f64", -2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.strings", ["", "a", "ünïcode", "x" * 300])
    w.add_array("t.ints", [3, -1, 2 ** 30])
    w.add_key_value("t.floats", [0.5, -1.0, 3.25], V.ARRAY, V.FLOAT32)
    w.add_key_value("t.bools", [True, False, True], V.ARRAY, V.BOOL)
    w.add_key_value("t.u64s", [2 ** 40, 1], V.ARRAY, V.UINT64)
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.ones(32, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_fast_reader_reads_what_gguf_py_reads(tmp_path):
    path = tmp_path / "kinds.gguf"
    _write_every_kind(path)
    fast, ref = FastGGUFReader(path), gguf.GGUFReader(path)
    assert list(fast.fields) == list(ref.fields)
    for key, f in ref.fields.items():
        g = fast.fields[key]
        assert (g.offset, g.types, g.data) == (f.offset, f.types, f.data), key
        assert [(p.dtype, p.shape, p.tobytes()) for p in g.parts] == [(p.dtype, p.shape, p.tobytes()) for p in f.parts], key
        assert g.contents() == f.contents(), key
    assert fast.fields["t.strings"].contents() == ["", "a", "ünïcode", "x" * 300]
    assert [(t.name, t.data_offset, t.data.tobytes()) for t in fast.tensors] == \
        [(t.name, t.data_offset, t.data.tobytes()) for t in ref.tensors]


def test_truncated_string_array_is_a_clear_error(tmp_path):
    path = tmp_path / "kinds.gguf"
    _write_every_kind(path)
    raw = path.read_bytes()
    cut = raw.index(b"\xc3\xbcn\xc3\xafcode") + 3  # inside the string array
    (tmp_path / "cut.gguf").write_bytes(raw[:cut])
    with pytest.raises(PocketError, match="not a readable GGUF file"):
        open_gguf(tmp_path / "cut.gguf")
