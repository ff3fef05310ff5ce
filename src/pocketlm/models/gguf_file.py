"""Reading GGUF files through gguf-py, with corrupt and truncated files turned into clear errors."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np

from ..errors import PocketError

_ARRAY, _STRING = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING


class FastGGUFReader(gguf.GGUFReader):
    """gguf-py's reader with array fields parsed in bulk: the same fields, parts and tensors.

    Why: gguf-py builds each element of an array field through numpy memmap views, several per
    element. Gemma 3's 262k-token vocabulary (three such arrays) then takes ~40 s per open, and
    transformers opens a GGUF three times to load one (config, tokenizer, weights): two minutes
    before any work. Slicing a plain ndarray over the same mapping and walking the string
    lengths directly makes that well under a second.
    """

    @property
    def data(self):
        return self._mapped

    @data.setter
    def data(self, value):
        self._mapped = value
        self._flat = value.view(np.ndarray)  # slices of a plain ndarray skip memmap's per-view work

    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        size = np.dtype(dtype).itemsize
        arr = self._flat[offset:offset + size * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != _ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        sub, n, offs = gguf.GGUFValueType(int(itype[0])), int(alen[0]), orig_offs + 12
        parts: list = [itype, alen]
        types = [_ARRAY] + ([sub] if n else [])
        scalar = self.gguf_scalar_to_np.get(sub)
        if scalar is not None:
            values = self._get(offs, scalar, n)
            parts += list(values.reshape(n, 1))  # one part per element, as gguf-py lays them out
            return 12 + int(values.nbytes), parts, list(range(2, 2 + n)), types
        if sub != _STRING:  # arrays of arrays: rare, small, gguf-py's own walk
            return super()._get_field_parts(orig_offs, raw_type)
        flat, idxs = self._flat, []
        end = len(flat)
        for _ in range(n):
            if offs + 8 > end:
                raise ValueError(f"string array runs past the end of the file at byte {offs}")
            length = flat[offs:offs + 8].view(np.uint64)
            size = int(length[0])
            if offs + 8 + size > end:
                raise ValueError(f"a string of {size} bytes runs past the end of the file at byte {offs}")
            parts += [length, flat[offs + 8:offs + 8 + size]]
            idxs.append(len(parts) - 1)
            offs += 8 + size
        return offs - orig_offs, parts, idxs, types


@contextmanager
def fast_gguf_for_transformers():
    """transformers' GGUF loader looks gguf.GGUFReader up at call time: give it the fast one for
    the duration of a load (see FastGGUFReader for why), then put gguf-py's back."""
    original = gguf.GGUFReader
    gguf.GGUFReader = FastGGUFReader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def open_gguf(path: str | Path):
    path = Path(path)
    try:
        reader = FastGGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct errors on damage
        raise PocketError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    for key, f in reader.fields.items():
        try:
            f.contents()  # every string decodes now, or every later reader of it fails with a traceback
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise PocketError(f"{path} is not a readable GGUF file (field {key!r}: {type(exc).__name__}: {exc})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise PocketError(f"{path} is truncated: tensor {t.name} ends at byte {end} of {size}")
    return reader


def field_value(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def all_fields(reader) -> dict:
    """Every key/value pair except the GGUF header's own bookkeeping."""
    return {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def copy_metadata(reader, writer, skip: tuple[str, ...] = ()) -> None:
    """Every key/value pair of `reader` into `writer`, types preserved, except `skip` and the
    header's own bookkeeping (and the architecture, which the writer is created with)."""
    import gguf

    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub)
