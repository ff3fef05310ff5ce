"""Documents from files, split along their own structure: headings, and pages for PDFs.

Formats: plain text, Markdown, reStructuredText, HTML, PDF (text layer, via pypdf) and DOCX
(via python-docx). Distillation's domain mode and the RAG index read documents through the
same functions, so a folder that indexes is a folder that trains.
"""
from __future__ import annotations

import html.parser
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PocketError

KINDS = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".rst": "rst", ".html": "html", ".htm": "html",
         ".pdf": "pdf", ".docx": "docx"}


@dataclass
class Section:
    heading: str  # heading path, "Top > Sub"; "" before the first heading
    text: str
    page: int | None = None


@dataclass
class Document:
    path: Path
    title: str
    sections: list[Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the reader had to repair, for the user to see

    @property
    def text(self) -> str:
        return "\n\n".join(s.text for s in self.sections if s.text.strip())


def kind_of(path: Path) -> str | None:
    """By suffix; Sphinx sources such as `x.rst.txt` count as their inner type."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if len(suffixes) == 2 and suffixes[1] == ".txt" and suffixes[0] in KINDS:
        return KINDS[suffixes[0]]
    return KINDS.get(suffixes[-1]) if suffixes else None


def find_documents(paths, skipped: list | None = None) -> list[Path]:
    """Files given, and supported files under folders given (sorted: a stable order). Broken
    symlinks and symlink loops under a folder go to `skipped` as (path, why), not silently."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.name.startswith(".") or not kind_of(f):
                    continue
                if f.is_file():
                    found.append(f)
                elif f.is_symlink() and skipped is not None:
                    skipped.append((str(f), "a broken symlink or a symlink loop"))
        elif p.is_file():
            found.append(p)
        else:
            raise PocketError(f"no such file or folder: {p}")
    return found


def load_document(path: Path) -> Document:
    path = Path(path)
    kind = kind_of(path) or "text"
    if kind == "pdf":
        return _pdf(path)
    if kind == "docx":
        return _docx(path)
    text, notes = _decode(path)
    sections = {"markdown": _markdown, "rst": _rst, "html": _html}.get(kind, _plain)(text)
    title = next((s.heading.split(" > ")[0] for s in sections if s.heading), path.stem)
    return Document(path, title, [s for s in sections if s.text.strip() or s.heading], notes)


def read_document(path: Path) -> str:
    """The document's text with its headings, as one string (what distillation trains on)."""
    doc = load_document(path)
    parts = []
    for s in doc.sections:
        head = s.heading.split(" > ")[-1] if s.heading else ""
        parts.append(f"{head}\n\n{s.text}".strip() if head else s.text.strip())
    return "\n\n".join(p for p in parts if p)


BAD_BYTES_KEPT = 0.01  # a text with at most this share of undecodable bytes is read, with them replaced


def _decode(path: Path) -> tuple[str, list[str]]:
    """The file's text and what had to be repaired. A few bad bytes (a stray Latin-1 character
    in a UTF-8 file) should not cost the whole document; a file mostly in another encoding is
    refused, since its text would be garbled."""
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise PocketError(f"{path} looks binary, not a text document")
    try:
        return raw.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8-sig", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8-sig", errors="ignore").count("\ufffd")
    if bad > BAD_BYTES_KEPT * max(1, len(raw)):
        raise PocketError(f"{path} is not UTF-8 text ({bad} of {len(raw)} bytes do not decode)")
    return text, [f"{bad} byte{'s' if bad != 1 else ''} that {'are' if bad != 1 else 'is'} not UTF-8 replaced by \ufffd"]


def _plain(text: str) -> list[Section]:
    return [Section("", text.strip())]


class _Headings:
    """A heading stack that yields one Section per heading."""

    def __init__(self):
        self.stack: list[tuple[int, str]] = []
        self.sections: list[Section] = [Section("", "")]
        self.lines: list[str] = []

    def flush(self) -> None:
        self.sections[-1].text = "\n".join(self.lines).strip()
        self.lines = []

    def heading(self, level: int, title: str) -> None:
        self.flush()
        self.stack = [(lv, t) for lv, t in self.stack if lv < level] + [(level, title.strip())]
        self.sections.append(Section(" > ".join(t for _, t in self.stack), ""))

    def done(self) -> list[Section]:
        self.flush()
        return self.sections


def _markdown(text: str) -> list[Section]:
    h, fenced = _Headings(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            h.heading(len(m.group(1)), m.group(2))
        else:
            h.lines.append(line)
    return h.done()


_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+_:.])\1{2,}\s*$")


def _rst(text: str) -> list[Section]:
    """Titles are lines underlined (optionally overlined) by one punctuation character
    repeated; their level is the order in which each style first appears, as docutils does."""
    h, styles = _Headings(), []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        over = _RST_UNDERLINE.match(line)
        if over and i + 2 < len(lines) and lines[i + 1].strip() and _RST_UNDERLINE.match(lines[i + 2]) \
                and lines[i + 2][0] == line[0]:
            style, title, step = (line[0], True), lines[i + 1], 3
        elif line.strip() and not over and _RST_UNDERLINE.match(nxt) and len(nxt.rstrip()) >= len(line.rstrip()):
            style, title, step = (nxt[0], False), line, 2
        else:
            h.lines.append(line)
            i += 1
            continue
        if style not in styles:
            styles.append(style)
        h.heading(styles.index(style) + 1, title)
        i += step
    return h.done()


class _HtmlSections(html.parser.HTMLParser):
    SKIP = {"script", "style", "head", "nav", "footer"}
    BLOCK = {"p", "div", "br", "li", "pre", "tr", "section", "article", "table", "ul", "ol", "dd", "dt"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.h = _Headings()
        self.skipping = 0
        self.in_heading: int | None = None
        self.heading_text: list[str] = []
        self.buffer: list[str] = []

    def _flush_text(self):
        text = "".join(self.buffer)
        self.buffer = []
        self.h.lines += text.split("\n")

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush_text()
            self.in_heading, self.heading_text = int(tag[1]), []
        elif tag in self.BLOCK:
            self.buffer.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif self.in_heading and tag == f"h{self.in_heading}":
            self.h.heading(self.in_heading, " ".join("".join(self.heading_text).split()))
            self.in_heading = None
        elif tag in self.BLOCK:
            self.buffer.append("\n")

    def handle_data(self, data):
        if self.skipping:
            return
        (self.heading_text if self.in_heading else self.buffer).append(data)


def _html(text: str) -> list[Section]:
    parser = _HtmlSections()
    parser.feed(text)
    parser.close()
    parser._flush_text()
    sections = parser.h.done()
    for s in sections:
        s.text = re.sub(r"\n\s*\n+", "\n\n", s.text).strip()
    return sections


def _pdf(path: Path) -> Document:
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    # pypdf logs every repair it makes on a damaged file; the user gets one line from us instead
    logging.getLogger("pypdf").setLevel(logging.ERROR)

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise PocketError(f"{path} is an encrypted PDF; decrypt it first (e.g. qpdf --decrypt)")
        pages = [Section("", (page.extract_text() or "").strip(), page=i + 1) for i, page in enumerate(reader.pages)]
        title = (reader.metadata.title if reader.metadata and reader.metadata.title else None) or path.stem
    except PocketError:
        raise
    except (PdfReadError, ValueError, KeyError, OSError) as exc:
        raise PocketError(f"{path} is not a readable PDF: {exc}") from None
    except Exception as exc:  # pypdf raises many types on damaged files; all mean the same to a user
        if "encrypt" in str(exc).lower() or "crypt" in type(exc).__name__.lower():
            raise PocketError(f"{path} is an encrypted PDF; decrypt it first (e.g. qpdf --decrypt)") from None
        raise PocketError(f"{path} is not a readable PDF: {exc}") from None
    return Document(path, str(title), [p for p in pages if p.text])


def _docx(path: Path) -> Document:
    import docx

    try:
        document = docx.Document(str(path))
    except Exception as exc:  # a zip that is not a Word file, a damaged one: one message
        raise PocketError(f"{path} is not a readable .docx file: {exc}") from None
    h, title = _Headings(), None
    for para in document.paragraphs:
        style = (para.style.name if para.style is not None else "") or ""
        m = re.match(r"Heading (\d)", style)
        if style == "Title" and para.text.strip():
            title = para.text.strip()
        elif m and para.text.strip():
            h.heading(int(m.group(1)), para.text)
        else:
            h.lines.append(para.text)
    sections = [s for s in h.done() if s.text.strip() or s.heading]
    return Document(path, title or next((s.heading.split(" > ")[0] for s in sections if s.heading), path.stem), sections)
