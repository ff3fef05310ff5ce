"""BM25, dense and hybrid retrieval over a Store. Hybrid fuses the two rankings by
reciprocal rank (score = sum of 1 / (60 + rank)), which needs no score calibration between
BM25's unbounded scores and cosine similarities."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import PocketError
from .embedder import DEFAULT_EMBEDDER, Embedder
from .store import AnyStore, ChunkRow, open_store

MODES = ("bm25", "dense", "hybrid")
RRF_K = 60


@dataclass
class Hit:
    chunk: ChunkRow
    score: float
    bm25: float | None = None
    cosine: float | None = None


class Retriever:
    def __init__(self, store: AnyStore, embedder: Embedder | None = None):
        self.store = store
        self.embedder = embedder
        self.last_ms = 0.0
        # Hybrid search embeds the query while SQLite runs the FTS query: both release the GIL,
        # so the two overlap on two cores (the p50 drops from their sum to about the slower one).
        self._embedding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-query")

    def search(self, query: str, mode: str = "hybrid", k: int = 5, pool: int = 50,
               vector: np.ndarray | None = None) -> list[Hit]:
        """`vector`: the query's embedding, when the caller already has it."""
        if not query.strip():  # every passage would score alike: any answer would be arbitrary
            raise PocketError("the query is empty")
        if mode not in MODES:
            raise PocketError(f"unknown --mode {mode!r} (choose one of {', '.join(MODES)})")
        t0 = time.perf_counter()
        n = max(pool, k)
        pending = None
        if mode != "bm25" and vector is None:
            if self.embedder is None:
                raise PocketError("dense retrieval needs the index's embedder")
            pending = self._embedding.submit(self.embedder.encode, [query])
        lexical = self.store.search_text(query, n) if mode != "dense" else []
        dense = []
        if mode != "bm25":
            qvec = vector if pending is None else pending.result()[0]
            assert qvec is not None  # given, or embedded just above
            dense = self.store.search(qvec, n)
        if mode == "bm25":
            fused = lexical
        elif mode == "dense":
            fused = dense
        else:
            fused = rrf([[cid for cid, _ in lexical], [cid for cid, _ in dense]])
        top = fused[:k]
        rows = self.store.chunks([cid for cid, _ in top])
        bm, cos = dict(lexical), dict(dense)
        self.last_ms = 1000 * (time.perf_counter() - t0)
        return [Hit(rows[cid], float(s), bm.get(cid), cos.get(cid)) for cid, s in top if cid in rows]


def rrf(rankings: list[list[int]]) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of id rankings, best first (the benchmark's baselines use it too)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, cid in enumerate(ranking):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
    return sorted(scores.items(), key=lambda x: -x[1])


def open_retriever(db, needs_embedder: bool) -> Retriever:
    """A retriever over an existing index, with the embedder the index was built with."""
    store = open_store(db)
    if store.meta("embedder") is None:
        raise PocketError(f"{db} holds no index yet; run `pocketlm index FOLDER --db {db}`")
    embedder = None
    if needs_embedder:
        name = store.meta("embedder_name")
        embedder = Embedder(None if name == DEFAULT_EMBEDDER else name)
        if embedder.identity != store.meta("embedder"):
            raise PocketError(f"{db} was built with another version of embedder {name}; rebuild the index")
    return Retriever(store, embedder)
