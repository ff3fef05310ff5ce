"""Documents from files: plain text, Markdown, reStructuredText, HTML (text only).

Distillation's domain mode and the RAG index read documents through the same functions, so
a folder that indexes is a folder that trains.
"""
from __future__ import annotations

import html.parser
from pathlib import Path

from ..errors import PocketError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES


def find_documents(paths) -> list[Path]:
    """Files given, and supported files under folders given (sorted: a stable order)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and _kind(f) and not f.name.startswith("."))
        elif p.is_file():
            found.append(p)
        else:
            raise PocketError(f"no such file or folder: {p}")
    return found


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED, key=len, reverse=True):
        if name.endswith(suffix) or name.endswith(suffix + ".txt"):
            return "html" if suffix in HTML_SUFFIXES else "text"
    return None


def read_document(path: Path) -> str:
    """The document's text; a clear error for binary or undecodable files."""
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise PocketError(f"{path} looks binary, not a text document")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PocketError(f"{path} is not UTF-8 text") from None
    return _html_text(text) if _kind(path) == "html" else text


class _TextOnly(html.parser.HTMLParser):
    SKIP = {"script", "style", "head", "nav"}
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def _html_text(markup: str) -> str:
    parser = _TextOnly()
    parser.feed(markup)
    return "".join(parser.parts)
