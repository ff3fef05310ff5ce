"""The index on PostgreSQL + pgvector, for a corpus a team shares: the same methods as the
SQLite `Store` (rag/store.py), so indexing, retrieval, `ask` and the server use it unchanged.

- vectors: pgvector `vector(d)` with an HNSW index on inner product (the embedder's vectors are
  normalised, so inner product is cosine); `hnsw.ef_search` is raised to the pool asked for,
  since HNSW returns at most ef_search rows. The graph is built with ef_construction 128, not
  pgvector's 64: at 220k chunks the default graph found 0.981 of the exact top 5 whatever the
  ef_search (0.985 at 400), one rebuilt at 128 found 0.995 at ef_search 100 (bench/rag_stores.py).
- lexical half: PostgreSQL's full-text search (an `english` tsvector of heading + text, stored
  and GIN-indexed), words OR-ed as the SQLite index does, but ranked by BM25's inverse document
  frequency, which `ts_rank_cd` lacks (measured at 220k chunks: recall@1 0.37 against SQLite's
  BM25 0.69). Each chunk-level document frequency lives in `pocketlm_terms`, kept by the same
  transaction that adds or deletes a document. A query's rarest words choose the candidates
  (a word in a tenth of the table would make PostgreSQL rank a tenth of the table: p95 194 ms);
  every query word then adds its idf to a candidate that holds it.
- writers: each document is replaced in one transaction under an advisory lock on its path,
  so two `pocketlm index` runs into one database never lose a file or duplicate its chunks.

Tables are prefixed `pocketlm_` and the chunk table is made at the first add, when the
vectors' dimension is known.
"""
from __future__ import annotations

import re
import time
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..errors import PocketError
from .store import ChunkRow

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS pocketlm_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pocketlm_documents(
  id BIGSERIAL PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL, title TEXT, indexed_at DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS pocketlm_terms(lexeme TEXT PRIMARY KEY, df BIGINT NOT NULL);
"""
CHUNKS = """
CREATE TABLE IF NOT EXISTS pocketlm_chunks(
  id BIGSERIAL PRIMARY KEY, doc_id BIGINT NOT NULL REFERENCES pocketlm_documents(id) ON DELETE CASCADE,
  ord INTEGER NOT NULL, heading TEXT, page INTEGER, text TEXT NOT NULL, embedding vector({dim}) NOT NULL,
  tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', coalesce(heading, '') || ' ' || text)) STORED);
CREATE INDEX IF NOT EXISTS pocketlm_chunks_doc ON pocketlm_chunks(doc_id);
CREATE INDEX IF NOT EXISTS pocketlm_chunks_tsv ON pocketlm_chunks USING gin(tsv);
CREATE INDEX IF NOT EXISTS pocketlm_chunks_hnsw ON pocketlm_chunks USING hnsw (embedding vector_ip_ops)
  WITH (m = 16, ef_construction = 128);
"""
SCHEMA_LOCK = 0x706F636B  # advisory lock key while creating tables: concurrent CREATE ... IF NOT EXISTS races
LEXICON = "1"  # version of pocketlm_terms' contents; an index without it is counted again by `index`
ALL = ""  # pocketlm_terms' row for the number of chunks (no lexeme is empty)
CANDIDATES = 2000  # rows the rarest query words may select before commoner words stop being added (see search_text)


def is_url(db) -> bool:
    return str(db).startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password: what messages show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _lexeme(word: str) -> str:
    """A lexeme as tsquery text, taken as it is (no dictionary): quoted, quotes and backslashes doubled."""
    return "'" + word.replace("\\", "\\\\").replace("'", "''") + "'"


def _vec(v) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(v, dtype=np.float32)) + "]"


class PgStore:
    def __init__(self, url: str, create: bool = False):
        try:
            import psycopg
        except ImportError:
            raise PocketError("a postgresql:// index needs psycopg (pip install 'psycopg[binary]')") from None
        self.url, self.path = url, redact(url)
        self._chunks_seen = self._lexicon_seen = False
        try:
            self.db = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise PocketError(f"cannot connect to {self.path}: {str(exc).strip().splitlines()[0]}") from None
        has = self._one("SELECT to_regclass('pocketlm_meta') IS NOT NULL")
        if not has and not create:
            self.db.close()
            raise PocketError(f"no index at {self.path}; build one with `pocketlm index FOLDER --db {self.path}`")
        if not has:
            try:
                with self.db.transaction():
                    self.db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    self.db.execute(SCHEMA)
            except psycopg.Error as exc:
                raise PocketError(f"cannot create the index at {self.path} (is the pgvector extension installed?): "
                                  f"{str(exc).strip().splitlines()[0]}") from None
        if create and self.meta("lexicon") != LEXICON:
            self._count_terms()

    def _one(self, sql: str, args=()):
        row = self.db.execute(sql, args).fetchone()
        return row[0] if row else None

    def _has_chunks(self) -> bool:
        """Whether the chunk table exists yet (made at the first add, by any writer). Once seen it
        stays: asked again only until then, not at every search."""
        if not self._chunks_seen:
            self._chunks_seen = bool(self._one("SELECT to_regclass('pocketlm_chunks') IS NOT NULL"))
        return self._chunks_seen

    def _count_terms(self) -> None:
        """(Re)count every lexeme's document frequency: an index made before pocketlm_terms, or
        with another LEXICON. Writers wait meanwhile (the chunk table is locked against them)."""
        with self.db.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            self.db.execute("CREATE TABLE IF NOT EXISTS pocketlm_terms(lexeme TEXT PRIMARY KEY, df BIGINT NOT NULL)")
            if self._has_chunks():  # before the DELETE, or a writer's new lexeme could slip in between
                self.db.execute("LOCK TABLE pocketlm_chunks IN SHARE MODE")
            self.db.execute("DELETE FROM pocketlm_terms")
            if self._has_chunks():
                self.db.execute("INSERT INTO pocketlm_terms SELECT word, ndoc FROM ts_stat('SELECT tsv FROM pocketlm_chunks')")
                self.db.execute("INSERT INTO pocketlm_terms VALUES (%s, (SELECT COUNT(*) FROM pocketlm_chunks))", (ALL,))
            self.db.execute("INSERT INTO pocketlm_meta(key, value) VALUES ('lexicon', %s) "
                            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (LEXICON,))

    def _terms_at(self, path: str) -> dict[str, int]:
        """_terms_of the document indexed from `path`, if any."""
        return self._terms_of(self._one("SELECT id FROM pocketlm_documents WHERE path = %s", (path,)))

    def _terms_of(self, doc_id) -> dict[str, int]:
        """Chunk-level document frequencies of one document's lexemes (and its chunk count)."""
        if doc_id is None:
            return {}
        rows = self.db.execute(f"SELECT word, ndoc FROM ts_stat('SELECT tsv FROM pocketlm_chunks WHERE doc_id = {int(doc_id)}')")
        terms = dict(rows.fetchall())
        terms[ALL] = int(self._one("SELECT COUNT(*) FROM pocketlm_chunks WHERE doc_id = %s", (doc_id,)))
        return terms

    def _change_terms(self, before: dict[str, int], after: dict[str, int]) -> None:
        """Add a document's change to pocketlm_terms. Rows are locked in lexeme order, the same in
        every writer, so two writers' transactions wait for each other but never deadlock."""
        delta = {w: after.get(w, 0) - before.get(w, 0) for w in before.keys() | after.keys()}
        words = sorted(w for w, d in delta.items() if d)
        if words:
            self.db.execute("INSERT INTO pocketlm_terms(lexeme, df) SELECT * FROM unnest(%s::text[], %s::bigint[]) "
                            "ORDER BY 1 ON CONFLICT (lexeme) DO UPDATE SET df = pocketlm_terms.df + excluded.df",
                            (words, [delta[w] for w in words]))

    # -- settings the index was built with ------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        value = self._one("SELECT value FROM pocketlm_meta WHERE key = %s", (key,))
        return default if value is None else value

    def meta_items(self) -> dict[str, str]:
        """Every setting, read in one statement: one snapshot even while another writer sets them."""
        return dict(self.db.execute("SELECT key, value FROM pocketlm_meta").fetchall())

    def set_meta(self, **values) -> None:
        with self.db.transaction():
            for k, v in values.items():
                self.db.execute("INSERT INTO pocketlm_meta(key, value) VALUES (%s, %s) "
                                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (k, str(v)))

    # -- documents ------------------------------------------------------------------------
    def document_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT path, sha256 FROM pocketlm_documents").fetchall())

    def add_document(self, path: str, sha256: str, title: str, chunks, vectors: np.ndarray, int8: bool) -> None:
        """Replace the document's chunks in one transaction: a crash leaves the old or the new."""
        if int8:
            raise PocketError("int8 vectors are an SQLite index's option; PostgreSQL stores float32 (pgvector)")
        vectors = np.asarray(vectors, dtype=np.float32)
        with self.db.transaction():
            if not self._has_chunks():
                self.db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                self.db.execute(CHUNKS.format(dim=int(vectors.shape[1])))
            self.db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (path,))
            before = self._terms_at(path)
            self.db.execute("DELETE FROM pocketlm_documents WHERE path = %s", (path,))
            doc_id = self._one("INSERT INTO pocketlm_documents(path, sha256, title, indexed_at) VALUES (%s, %s, %s, %s) "
                               "RETURNING id", (path, sha256, title, time.time()))
            with self.db.cursor() as cur:
                cur.executemany("INSERT INTO pocketlm_chunks(doc_id, ord, heading, page, text, embedding) "
                                "VALUES (%s, %s, %s, %s, %s, %s::vector)",
                                [(doc_id, c.ord, c.heading, c.page, c.text, _vec(v)) for c, v in zip(chunks, vectors)])
            self._change_terms(before, self._terms_of(doc_id))

    def delete_document(self, path: str) -> None:
        with self.db.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (path,))
            if self._has_chunks():
                self._change_terms(self._terms_at(path), {})
            self.db.execute("DELETE FROM pocketlm_documents WHERE path = %s", (path,))

    def forget_vectors(self) -> None:
        """Nothing is held in memory: every search reads the database."""

    def counts(self) -> tuple[int, int]:
        chunks = self._one("SELECT COUNT(*) FROM pocketlm_chunks") if self._has_chunks() else 0
        return int(self._one("SELECT COUNT(*) FROM pocketlm_documents")), int(chunks)

    # -- retrieval --------------------------------------------------------------------------
    def search_text(self, query: str, k: int) -> list[tuple[int, float]]:
        """Full-text search over heading + text; (chunk id, score) best first."""
        if not re.search(r"\w", query) or not self._has_chunks():
            return []
        if not self._lexicon_seen:  # asked until seen, as _has_chunks is
            self._lexicon_seen = self.meta("lexicon") == LEXICON
        if not self._lexicon_seen:  # an index from before pocketlm_terms, until `index` counts it
            words = list(dict.fromkeys(re.findall(r"\w+", query.lower())))
            rows = self.db.execute(
                "SELECT id, ts_rank_cd(tsv, q, 1) AS r FROM pocketlm_chunks, to_tsquery('english', %s) q "
                "WHERE tsv @@ q ORDER BY r DESC, id LIMIT %s", (" | ".join(words), k)).fetchall()
            return [(int(i), float(r)) for i, r in rows]
        # The query's lexemes as the english configuration makes them (stemmed, stop words gone).
        df: dict[str, int] = dict(self.db.execute(
            "SELECT lexeme, df FROM pocketlm_terms WHERE df > 0 AND (lexeme = %s OR lexeme IN "
            "(SELECT lexeme FROM unnest(to_tsvector('english', %s))))", (ALL, query)).fetchall())
        n = df.pop(ALL, 0)
        words = sorted(df, key=lambda w: (df[w], w))
        chosen: list[str] = []
        selected = 0
        for w in words:
            if chosen and selected + df[w] > CANDIDATES:
                break
            chosen.append(w)
            selected += df[w]
        if not chosen:
            return []
        # BM25's idf (the +1 keeps it positive); chunks are short and alike in length, so the
        # term-frequency and length parts of BM25 are left out.
        idf = [float(np.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))) for w in words]
        score = " + ".join("CASE WHEN tsv @@ %s::tsquery THEN %s ELSE 0 END" for _ in words)
        args: list = [a for w, i in zip(words, idf) for a in (_lexeme(w), i)]
        rows = self.db.execute(
            f"SELECT id, {score} AS r FROM pocketlm_chunks WHERE tsv @@ %s::tsquery ORDER BY r DESC, id LIMIT %s",
            (*args, " | ".join(_lexeme(w) for w in chosen), k)).fetchall()
        return [(int(i), float(r)) for i, r in rows]

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        if not self._has_chunks():
            return []
        with self.db.transaction():  # SET LOCAL lasts for this transaction only
            self.db.execute(f"SET LOCAL hnsw.ef_search = {max(100, 2 * int(k))}")
            rows = self.db.execute("SELECT id, -(embedding <#> %s::vector) FROM pocketlm_chunks "
                                   "ORDER BY embedding <#> %s::vector LIMIT %s", (_vec(vector), _vec(vector), k)).fetchall()
        return [(int(i), float(s)) for i, s in rows]

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, (n, dim) float32 matrix): exact search's reference (benchmarks, tests)."""
        if not self._has_chunks():
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        rows = self.db.execute("SELECT id, embedding::text FROM pocketlm_chunks ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        mat = np.stack([np.array(r[1].strip("[]").split(","), dtype=np.float32) for r in rows]) if rows else \
            np.zeros((0, 0), np.float32)
        return ids, mat

    def chunks(self, ids: list[int]) -> dict[int, ChunkRow]:
        if not ids or not self._has_chunks():
            return {}
        rows = self.db.execute("SELECT c.id, d.path, d.title, c.heading, c.page, c.text FROM pocketlm_chunks c "
                               "JOIN pocketlm_documents d ON d.id = c.doc_id WHERE c.id = ANY(%s)", (list(ids),)).fetchall()
        return {r[0]: ChunkRow(*r) for r in rows}

    def close(self) -> None:
        self.db.close()
