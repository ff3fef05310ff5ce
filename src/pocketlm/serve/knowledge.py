"""The server's knowledge base: retrieval, embeddings and uploads over one `pocketlm index` file.

Everything that touches the SQLite index runs on one dedicated thread: a sqlite3 connection
belongs to the thread that opened it, and one writer at a time is what the index expects
anyway. Retrieval takes ~10 ms there, so serialising it costs nothing next to generation.
"""
from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import PocketError
from ..rag import answer as rag_answer
from ..rag.index import index_paths
from ..rag.loaders import kind_of
from ..rag.pgstore import is_url
from ..rag.retrieve import open_retriever
from ..util.atomic import atomic_path

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str) -> str:
    """The last path component, with anything but letters, digits, '.', '_' and '-' replaced:
    an upload can never name a path outside the uploads folder or a hidden file."""
    base = SAFE_NAME.sub("_", Path(name.replace("\\", "/")).name).lstrip("._")
    if not base or kind_of(Path(base)) is None:
        raise PocketError(f"{name!r}: upload a .txt, .md, .rst, .html, .pdf or .docx file")
    return base[:120]


class KnowledgeBase:
    def __init__(self, db: str | Path, uploads: str | Path | None = None):
        self.db = db
        if uploads:
            self.uploads = Path(uploads)
        elif is_url(db):  # a shared database: the uploads stay with this server, in its working folder
            self.uploads = Path("pocketlm-uploads").resolve()
        else:
            self.uploads = Path(db).with_name(Path(db).stem + "-uploads")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")
        self.retriever = self._thread.submit(open_retriever, self.db, True).result()
        assert self.retriever.embedder is not None  # open_retriever(..., True) loads it or raises
        self.embedder = self.retriever.embedder
        self.embedder_name = self.embedder.name

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def prepare(self, question: str, model, k: int, max_tokens: int) -> rag_answer.Prompt:
        return await self._run(rag_answer.prepare, question, self.retriever, model, k, "hybrid", max_tokens)

    async def embed(self, texts: list[str]):
        return await self._run(self.embedder.encode, texts)

    def count_tokens(self, text: str) -> int:
        return self.embedder.count_tokens(text)

    async def add_upload(self, filename: str, data: bytes) -> dict:
        return await self._run(self._add_upload, filename, data)

    def _add_upload(self, filename: str, data: bytes) -> dict:
        name = safe_filename(filename)
        target = self.uploads / name
        stem, dot, suffix = target.name.partition(".")
        n = 1
        while target.exists():  # never replace an earlier upload of the same name
            target = self.uploads / f"{stem}-{n}{dot}{suffix}"
            n += 1
        self.uploads.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        store = self.retriever.store
        report = index_paths([target], self.db, embedder=self.embedder, progress=False,
                             chunk_tokens=int(store.meta("chunk_tokens") or 256), overlap=int(store.meta("overlap") or 32),
                             int8=store.meta("vectors") == "int8")
        store.forget_vectors()
        if report.skipped:
            target.unlink(missing_ok=True)
            raise PocketError(f"{filename}: {report.skipped[0][1]}")
        return {"file": target.name, "chunks": report.chunks}
