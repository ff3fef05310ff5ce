"""A small mutation fuzzer for pocketlm's readers (tests/test_fuzz.py runs a few hundred cases,
bench/fuzz.py thousands). Each case takes a valid seed file, damages it in one to three ways
(bit flips, random or extreme bytes, cut, cut-out, repeated or inserted spans, length fields
set to 0 / 2^31 / 2^63 / 2^64-1), and runs a reader on it. The only acceptable outcomes are a
correct result or pocketlm's one-line error (PocketError); anything else, a traceback of another
type or a run past the time limit, is a failure, reported with the mutation that caused it.
"""
from __future__ import annotations

import random
import signal
import struct
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pocketlm.errors import PocketError

EXTREMES = [0, 1, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]


class Hang(Exception):
    pass


def mutate(data: bytes, rng: random.Random, focus: int | None = None) -> tuple[bytes, str]:
    """data damaged in 1-3 ways, and what was done. `focus`: most positions fall in the first
    `focus` bytes (a file's header, where its lengths and offsets live)."""
    buf = bytearray(data)
    done = []
    for _ in range(rng.randint(1, 3)):
        if not buf:
            buf += bytes([rng.randrange(256)])
        span = min(len(buf), focus) if focus and rng.random() < 0.8 else len(buf)
        at = rng.randrange(span)
        kind = rng.choice(["flip", "byte", "extreme", "cut", "cut-out", "repeat", "insert"])
        if kind == "flip":
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            buf[at] = rng.randrange(256)
        elif kind == "extreme":
            value = rng.choice(EXTREMES)
            width = rng.choice([4, 8])
            buf[at:at + width] = struct.pack("<Q", value)[:width] if width == 8 else struct.pack("<I", value % 2**32)
        elif kind == "cut":
            del buf[at:]
        elif kind == "cut-out":
            del buf[at:at + rng.randint(1, 64)]
        elif kind == "repeat":
            piece = buf[at:at + rng.randint(1, 64)]
            buf[at:at] = piece
        else:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        done.append(f"{kind}@{at}")
    return bytes(buf), " ".join(done)


@dataclass
class Tally:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)  # ok / error / traceback / hang
    failures: list = field(default_factory=list)  # (mutation, what happened)

    @property
    def bad(self) -> int:
        return self.outcomes["traceback"] + self.outcomes["hang"]


def _alarm(signum, frame):
    raise Hang()


def fuzz(seed_files: dict[str, bytes], place: Callable[[str, bytes], Path], read: Callable[[Path], object],
         cases: int, seed: int, focus: int | None = None, time_limit: float = 10.0) -> Tally:
    """Run `cases` mutants of the seed files through `read`. place(name, data) writes a mutant
    where the reader will find it and returns the path to read."""
    rng = random.Random(seed)
    tally = Tally()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for _ in range(cases):
            name = rng.choice(sorted(seed_files))
            data, how = mutate(seed_files[name], rng, focus)
            path = place(name, data)
            tally.cases += 1
            signal.setitimer(signal.ITIMER_REAL, time_limit)
            try:
                read(path)
                outcome = "ok"
            except PocketError:
                outcome = "error"
            except Hang:
                outcome = "hang"
                tally.failures.append((f"{name}: {how}", f"still running after {time_limit} s"))
            except Exception as exc:  # the defect being looked for: any other exception is a traceback
                outcome = "traceback"
                tally.failures.append((f"{name}: {how}", "".join(traceback.format_exception_only(exc)).strip()[:300]))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            tally.outcomes[outcome] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    return tally


def file_placer(folder: Path) -> Callable[[str, bytes], Path]:
    """place() for readers of one file: the mutant under the seed's name in `folder`."""
    def place(name: str, data: bytes) -> Path:
        (folder / name).write_bytes(data)
        return folder / name
    return place


def folder_placer(seed_folder: Path, work: Path) -> Callable[[str, bytes], Path]:
    """place() for readers of a folder: a fresh copy of the seed folder with one file damaged."""
    import shutil

    def place(name: str, data: bytes) -> Path:
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(seed_folder, work)
        (work / name).write_bytes(data)
        return work
    return place


# -- the readers under test, and seed files for them ----------------------------------------------------------

def read_gguf(path: Path) -> None:
    """What `info`, `export` and `quantize` do with a GGUF before any long work."""
    from pocketlm.models.info import inspect
    from pocketlm.models.tensors import open_tensors

    inspect(path)
    ts = open_tensors(path)
    for name in ts.names:
        if ts.shape(name)[0] > 0:
            ts.values(name, slice(0, 1))


def read_hf_folder(path: Path) -> None:
    """What `info`, `export`, `quantize` and `eval` check of a Hugging Face folder."""
    from pocketlm.models.info import inspect
    from pocketlm.models.tensors import open_tensors

    inspect(path)
    ts = open_tensors(path)
    ts.check_shapes()
    for name in ts.names:
        ts.values(name, slice(0, 1))


def read_document(path: Path) -> None:
    from pocketlm.rag.loaders import load_document

    load_document(path)


def one_page_pdf(text: str) -> bytes:
    """A minimal valid PDF with one line of Helvetica text (offsets computed, not hard-coded)."""
    stream = f"BT /F1 12 Tf 20 50 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 100] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def document_seeds(tmp: Path) -> dict[str, bytes]:
    import docx

    d = docx.Document()
    d.add_heading("Mills", level=1)
    d.add_paragraph("The mill by the river grinds wheat.")
    d.add_heading("Bread", level=2)
    d.add_paragraph("Dough rises for two hours.")
    d.save(str(tmp / "seed.docx"))
    return {
        "doc.md": b"# Mills\n\nThe mill grinds wheat.\n\n## Bread\n\nDough rises for *two* hours.\n\n```\ncode\n```\n",
        "doc.html": b"<html><head><title>Mills</title></head><body><h1>Mills</h1><p>The mill grinds <b>wheat</b>."
                    b"</p><h2>Bread</h2><ul><li>flour</li><li>water</li></ul><script>x()</script></body></html>",
        "doc.pdf": one_page_pdf("The mill grinds wheat by the river."),
        "doc.docx": (tmp / "seed.docx").read_bytes(),
    }
