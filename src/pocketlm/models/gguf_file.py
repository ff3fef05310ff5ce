"""Reading GGUF files through gguf-py, with corrupt and truncated files turned into clear errors."""
from __future__ import annotations

from pathlib import Path

from ..errors import PocketError


def open_gguf(path: str | Path):
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct errors on damage
        raise PocketError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
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
