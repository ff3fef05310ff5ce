"""The index: one SQLite file (WAL) with documents, chunks, an FTS5 table for BM25, and each
chunk's embedding as a normalised vector (float32, or int8 with a per-vector scale).

Retrieval and ingestion talk only to the `Store` methods below (add / delete / search_text /
vectors / chunks), so another engine can take this one's place without touching them.
Exact dense search loads every vector into one numpy matrix once per process: fine up to
~10^6 chunks.
"""
from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from ..errors import PocketError

if TYPE_CHECKING:
    from .pgstore import PgStore

BUSY_SECONDS = 30  # how long one run waits for another's write before giving up

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
  id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL, title TEXT, indexed_at REAL);
CREATE TABLE IF NOT EXISTS chunks(
  id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
  ord INTEGER NOT NULL, heading TEXT, page INTEGER, text TEXT NOT NULL, vector BLOB NOT NULL, scale REAL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
  heading, text, content='chunks', content_rowid='id', tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
  INSERT INTO chunks_fts(rowid, heading, text) VALUES (new.id, new.heading, new.text); END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
  INSERT INTO chunks_fts(chunks_fts, rowid, heading, text) VALUES ('delete', old.id, old.heading, old.text); END;
"""


@dataclass
class ChunkRow:
    id: int
    path: str
    title: str
    heading: str
    page: int | None
    text: str


class Store:
    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise PocketError(f"no index at {self.path}; build one with `pocketlm index FOLDER --db {self.path}`")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=BUSY_SECONDS)
        except sqlite3.Error as exc:  # a folder, or a path this user may not open
            raise PocketError(f"{self.path} is not a pocketlm index: {exc}") from None
        try:
            self._set_up()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            if isinstance(exc, sqlite3.OperationalError) and _locked(exc):
                raise PocketError(f"{self.path} stayed locked by another process for {BUSY_SECONDS} s; "
                                  f"try again when it is done") from None
            raise PocketError(f"{self.path} is not a pocketlm index: {exc}") from None
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None

    def _set_up(self) -> None:
        # Runs that open a new file at once race to turn on WAL and create the tables while the
        # file is still in rollback mode, where SQLite answers one of them "locked" at once
        # instead of waiting (it would deadlock otherwise), so the busy timeout alone does not
        # cover it (CI failed on it; 5 of 40 three-way races here): retry until the timeout's end.
        deadline = time.monotonic() + BUSY_SECONDS
        while True:
            try:
                tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if tables and "meta" not in tables:  # someone else's database: adding our tables would change it
                    self.db.close()
                    raise PocketError(f"{self.path} is an SQLite database of something else (tables: "
                                      f"{', '.join(sorted(tables)[:5])}); pocketlm will not add its index to it")
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA foreign_keys=ON")
                self.db.executescript(SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if not _locked(exc) or time.monotonic() > deadline:
                    raise
                if self.db.in_transaction:
                    self.db.rollback()
                time.sleep(0.05)

    # -- settings the index was built with ------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def meta_items(self) -> dict[str, str]:
        """Every setting, read in one statement."""
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def set_meta(self, **values) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                [(k, str(v)) for k, v in values.items()])

    # -- documents ------------------------------------------------------------------------
    def document_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT path, sha256 FROM documents"))

    def add_document(self, path: str, sha256: str, title: str, chunks, vectors: np.ndarray, int8: bool) -> None:
        """Replace the document's chunks in one transaction: a crash leaves the old or the new."""
        blobs = [_encode(v, int8) for v in vectors]
        with self.db:
            self.db.execute("DELETE FROM documents WHERE path = ?", (path,))
            cur = self.db.execute("INSERT INTO documents(path, sha256, title, indexed_at) VALUES (?, ?, ?, ?)",
                                  (path, sha256, title, time.time()))
            doc_id = cur.lastrowid
            self.db.executemany(
                "INSERT INTO chunks(doc_id, ord, heading, page, text, vector, scale) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(doc_id, c.ord, c.heading, c.page, c.text, blob, scale) for c, (blob, scale) in zip(chunks, blobs)])
        self._matrix = None

    def delete_document(self, path: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM documents WHERE path = ?", (path,))
        self._matrix = None

    def forget_vectors(self) -> None:
        """Another connection changed the index: reload the vectors at the next search."""
        self._matrix = None

    def counts(self) -> tuple[int, int]:
        return (self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0],
                self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    # -- retrieval --------------------------------------------------------------------------
    def search_text(self, query: str, k: int) -> list[tuple[int, float]]:
        """BM25 over heading + text; (chunk id, score) best first, higher is better."""
        words = re.findall(r"\w+", query.lower())
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in dict.fromkeys(words))
        rows = self.db.execute("SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? "
                               "ORDER BY bm25(chunks_fts) LIMIT ?", (match, k)).fetchall()
        return [(int(r), -float(s)) for r, s in rows]

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, (n, dim) float32 matrix), loaded once until the index changes."""
        if self._matrix is None:
            rows = self.db.execute("SELECT id, vector, scale FROM chunks ORDER BY id").fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            mat = np.stack([_decode(b, s) for _, b, s in rows]) if rows else np.zeros((0, 0), np.float32)
            self._matrix = (ids, mat)
        return self._matrix

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        ids, mat = self.vectors()
        if not len(ids):
            return []
        # In torch, not numpy: numpy's BLAS threads keep spinning after a call and starve the
        # next query embedding's torch threads on a 2-core machine (measured: 8 ms -> 22 ms).
        scores = (torch.from_numpy(mat) @ torch.from_numpy(np.asarray(vector, dtype=np.float32))).numpy()
        return [(int(ids[i]), float(scores[i])) for i in top_k(scores, k)]

    def chunks(self, ids: list[int]) -> dict[int, ChunkRow]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT c.id, d.path, d.title, c.heading, c.page, c.text FROM chunks c "
                               f"JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({marks})", ids).fetchall()
        return {r[0]: ChunkRow(*r) for r in rows}

    def close(self) -> None:
        self.db.close()


AnyStore = Union[Store, "PgStore"]  # the one interface both keep (tests/test_rag_stores.py runs both)


def open_store(db, create: bool = False) -> AnyStore:
    """The index named by --db: a postgresql:// URL (rag/pgstore.py) or an SQLite file."""
    from .pgstore import PgStore, is_url

    return PgStore(str(db), create) if is_url(db) else Store(db, create)


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first, without sorting all of them."""
    k = min(k, len(scores))
    idx = np.argpartition(-scores, k - 1)[:k]
    return idx[np.argsort(-scores[idx])]


def _encode(v: np.ndarray, int8: bool) -> tuple[bytes, float | None]:
    v = np.asarray(v, dtype=np.float32)
    if not int8:
        return v.tobytes(), None
    scale = float(np.abs(v).max()) or 1.0
    return np.rint(v / scale * 127).astype(np.int8).tobytes(), scale


def _decode(blob: bytes, scale: float | None) -> np.ndarray:
    if scale is None:
        return np.frombuffer(blob, dtype=np.float32)
    return np.frombuffer(blob, dtype=np.int8).astype(np.float32) * (scale / 127)
