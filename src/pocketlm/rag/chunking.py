"""Sections -> chunks of at most `chunk_tokens` embedder tokens, cut at paragraph boundaries.

A chunk never spans two sections (so its heading path is true for all of it); paragraphs are
packed greedily, a paragraph longer than the budget is cut at sentence ends (or, failing
that, by tokens), and consecutive chunks of a section share about `overlap` tokens so an
answer that straddles a cut is still whole in one of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..errors import PocketError
from .loaders import Document


@dataclass
class Chunk:
    ord: int
    heading: str
    page: int | None
    text: str


def _pieces(text: str, budget: int, count: Callable[[str], int]) -> list[str]:
    """Paragraphs, with any paragraph over budget split into sentences, then hard cuts."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if count(para) <= budget:
            out.append(para)
            continue
        for sent in re.split(r"(?<=[.!?])\s+", para):
            if count(sent) <= budget:
                out.append(sent)
            else:
                words = sent.split()
                step = max(1, len(words) * budget // max(count(sent), 1))
                out += [" ".join(words[i:i + step]) for i in range(0, len(words), step)]
    return out


def chunk_document(doc: Document, chunk_tokens: int, overlap: int, count: Callable[[str], int]) -> list[Chunk]:
    chunks: list[Chunk] = []
    for section in doc.sections:
        pieces = _pieces(section.text, chunk_tokens, count)
        sizes = [count(p) for p in pieces]
        start = 0
        while start < len(pieces):
            end, used = start, 0
            while end < len(pieces) and (end == start or used + sizes[end] <= chunk_tokens):
                used += sizes[end]
                end += 1
            chunks.append(Chunk(len(chunks), section.heading, section.page, "\n\n".join(pieces[start:end])))
            if end >= len(pieces):
                break
            back, carried = end, 0  # step back over trailing pieces worth ~overlap tokens
            while back - 1 > start and carried + sizes[back - 1] <= overlap:
                back -= 1
                carried += sizes[back]
            start = back
    return chunks


def check_chunking(chunk_tokens: int, overlap: int) -> None:
    """The one rule for chunk sizes (the CLI and the compress recipe both ask it)."""
    if chunk_tokens < 16 or not 0 <= overlap < chunk_tokens // 2:
        raise PocketError(f"chunk_tokens must be at least 16 and overlap below half of it (got {chunk_tokens} and {overlap})")
