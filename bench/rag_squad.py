"""Retrieval on SQuAD v1.1 dev, pocketlm's index against the usual baselines in one run.

Every one of the 2,067 paragraphs becomes a document (Markdown: article title as heading),
indexed by `pocketlm index` machinery; every one of the 10,565 questions is a query whose
gold paragraph must come back. Baselines, same run: rank_bm25's BM25Okapi over the raw
paragraphs, exact numpy dense search with the same embedder over the raw paragraphs, and their
reciprocal-rank fusion. Also: index throughput, search latency p50/p95 at ~10k chunks, int8
vectors' recall cost, bf16 vs fp32 embedding speed, and end-to-end answer EM/F1 of the
default model with retrieval vs closed-book on a fixed sample.

  .venv/bin/python bench/rag_squad.py [--questions N] [--e2e 200] [--skip-e2e]

Results: bench/results/rag_squad.md (and stdout).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import string
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from results_file import save_results  # noqa: E402

from pocketlm.rag.embedder import Embedder  # noqa: E402
from pocketlm.rag.index import index_paths  # noqa: E402
from pocketlm.rag.retrieve import Retriever, rrf  # noqa: E402
from pocketlm.rag.store import Store, top_k  # noqa: E402
from pocketlm.util.machine import cpu_name  # noqa: E402

SQUAD = ROOT.parent / "shared" / "data" / "qa" / "squad_v1.1_dev.json"
WORK = Path(os.environ.get("POCKETLM_BENCH_CACHE", Path.home() / ".cache" / "pocketlm-bench")) / "rag"
RESULTS = ROOT / "bench" / "results" / "rag_squad.md"


def load_squad():
    data = json.loads(SQUAD.read_text())["data"]
    paragraphs, questions = [], []
    for article in data:
        title = article["title"].replace("_", " ")
        for p in article["paragraphs"]:
            pid = len(paragraphs)
            paragraphs.append((title, p["context"]))
            for qa in p["qas"]:
                questions.append((qa["question"], pid, [a["text"] for a in qa["answers"]]))
    return paragraphs, questions


def write_docs(paragraphs, folder: Path) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for pid, (title, text) in enumerate(paragraphs):
        name = f"p{pid:05d}.md"
        (folder / name).write_text(f"# {title}\n\n{text}\n")
        names[str((folder / name).resolve())] = pid
    return names


def metrics(ranked: list[list[int]], gold: list[int]) -> dict:
    ranks = []
    for r, g in zip(ranked, gold):
        ranks.append(r.index(g) + 1 if g in r else None)
    n = len(gold)
    return {f"r@{k}": sum(1 for x in ranks if x and x <= k) / n for k in (1, 5, 10)} | \
        {"mrr": sum(1 / x for x in ranks if x) / n}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


# -- SQuAD's answer normalisation and scores (the official evaluation's definitions) --------------
def normalize(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def exact(pred: str, gold: str) -> float:
    return float(normalize(pred) == normalize(gold))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=None, help="first N questions only (default: all)")
    ap.add_argument("--e2e", type=int, default=200)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    if not SQUAD.exists():
        sys.exit(f"needs {SQUAD}")
    paragraphs, questions = load_squad()
    questions = questions[: args.questions] if args.questions else questions
    gold = [pid for _, pid, _ in questions]
    out = {"paragraphs": len(paragraphs), "questions": len(questions)}
    shutil.rmtree(WORK, ignore_errors=True)
    names = write_docs(paragraphs, WORK / "docs")
    emb = Embedder()

    t0 = time.perf_counter()
    report = index_paths([WORK / "docs"], WORK / "squad.db", embedder=emb, progress=True)
    out["index_s"], out["chunks"] = time.perf_counter() - t0, report.chunks
    store = Store(WORK / "squad.db")
    chunk_pid = {cid: names[row.path] for cid, row in store.chunks(list(map(int, store.vectors()[0]))).items()}
    retriever = Retriever(store, emb)

    q_texts = [q for q, _, _ in questions]
    t0 = time.perf_counter()
    q_vecs = emb.encode(q_texts, batch=64)
    out["query_embed_per_s"] = len(q_texts) / (time.perf_counter() - t0)
    ids, mat = store.vectors()

    def ours(mode):
        return [list(dict.fromkeys(chunk_pid[h.chunk.id] for h in retriever.search(q, mode, k=50, vector=v)))[:10]
                for q, v in zip(q_texts, q_vecs)]

    rows = {f"pocketlm {m}": metrics(ours(m), gold) for m in ("bm25", "dense", "hybrid")}

    from rank_bm25 import BM25Okapi

    bm = BM25Okapi([words(t) for _, t in paragraphs])
    base_lex = [list(np.argsort(-bm.get_scores(words(q)))[:50]) for q in q_texts]
    t0 = time.perf_counter()
    raw = emb.encode([t for _, t in paragraphs], batch=32)
    out["embed_bf16_per_s"] = len(paragraphs) / (time.perf_counter() - t0)
    base_dense = [list(top_k(raw @ v, 50)) for v in q_vecs]
    rows["rank_bm25 BM25Okapi"] = metrics([[int(x) for x in r[:10]] for r in base_lex], gold)
    rows["numpy exact dense (raw paragraphs)"] = metrics([[int(x) for x in r[:10]] for r in base_dense], gold)
    rows["baseline hybrid (RRF of the two)"] = metrics(
        [[c for c, _ in rrf([[int(x) for x in a], [int(x) for x in b]])][:10] for a, b in zip(base_lex, base_dense)], gold)

    # int8 vectors: same chunks, vectors stored as int8 + scale
    int8_mat = np.stack([np.rint(v / (np.abs(v).max() or 1) * 127).astype(np.int8).astype(np.float32)
                         * ((np.abs(v).max() or 1) / 127) for v in mat])
    rows["pocketlm dense, int8 vectors"] = metrics(
        [list(dict.fromkeys(chunk_pid[int(ids[i])] for i in top_k(int8_mat @ v, 50)))[:10] for v in q_vecs], gold)

    # fp32 embedder: speed and whether rankings change
    emb32 = Embedder(dtype="float32")
    t0 = time.perf_counter()
    raw32 = emb32.encode([t for _, t in paragraphs], batch=32)
    out["embed_fp32_per_s"] = len(paragraphs) / (time.perf_counter() - t0)
    q32 = emb32.encode(q_texts, batch=64)
    rows["numpy exact dense, fp32 embedder"] = metrics([[int(x) for x in top_k(raw32 @ v, 10)] for v in q32], gold)
    del emb32

    # latency at ~10k chunks: the same documents cut into ~40-token chunks
    index_paths([WORK / "docs"], WORK / "squad-small-chunks.db", embedder=emb, chunk_tokens=40, overlap=0, progress=True)
    small = Retriever(Store(WORK / "squad-small-chunks.db"), emb)
    out["latency_chunks"] = small.store.counts()[1]
    small.search("warm up", k=5)
    lat = {}
    for mode in ("bm25", "dense", "hybrid"):
        times = []
        for q in q_texts[:300]:
            small.search(q, mode=mode, k=5)
            times.append(small.last_ms)
        lat[mode] = (float(np.percentile(times, 50)), float(np.percentile(times, 95)))
    out["latency_ms"] = lat
    e2e = None if args.skip_e2e else end_to_end(questions, retriever, args.e2e)
    write_results(out, rows, e2e)


def end_to_end(questions, retriever, n: int) -> dict:
    from pocketlm.models.registry import DEFAULT_MODEL
    from pocketlm.models.source import resolve
    from pocketlm.rag.answer import EXAMPLE, REPEAT_PENALTY, ask
    from pocketlm.runtime.llama_cpp_backend import LlamaCppModel

    rng = np.random.default_rng(0)
    sample = [questions[i] for i in sorted(rng.choice(len(questions), size=min(n, len(questions)), replace=False))]
    model = LlamaCppModel(resolve(DEFAULT_MODEL).path, n_ctx=2048)
    # Closed-book gets the same worked example as `ask`, minus the sources, so that the two
    # differ only by retrieval and not by answer format.
    example_q = EXAMPLE[0]["content"].rsplit("\n\n", 1)[1]
    closed_prefix = [{"role": "system", "content": "Answer the question in a few words."},
                     {"role": "user", "content": example_q},
                     {"role": "assistant", "content": re.sub(r"\s*\[\d+\]", "", EXAMPLE[1]["content"])}]
    settings = {"rag k=1": [[], []], "rag k=3": [[], []], "closed-book": [[], []]}
    for q, _, answers in tqdm(sample, desc="end to end"):
        # the writing style, as this table always measured; extract-first answers: bench/rag_answers.py
        preds = {f"rag k={k}": re.sub(r"\[\d+\]", "", ask(q, retriever, model, k=k, max_tokens=32, style="write").text)
                 for k in (1, 3)}
        preds["closed-book"] = "".join(model.chat(closed_prefix + [{"role": "user", "content": f"Question: {q}"}],
                                                  max_tokens=32, temperature=0.0, seed=0, repeat_penalty=REPEAT_PENALTY))
        for label, pred in preds.items():
            settings[label][0].append(max(exact(pred, a) for a in answers))
            settings[label][1].append(max(f1(pred, a) for a in answers))
    return {k: {"em": float(np.mean(v[0])), "f1": float(np.mean(v[1])), "n": len(sample)} for k, v in settings.items()}


def write_results(out, rows, e2e) -> None:
    lines = ["# RAG on SQuAD v1.1 dev", "",
             f"Command: `.venv/bin/python bench/rag_squad.py` on {cpu_name()} ({os.cpu_count()} cores), "
             f"{time.strftime('%Y-%m-%d')}. {out['paragraphs']} paragraphs indexed as documents "
             f"({out['chunks']} chunks at 256 tokens), {out['questions']} questions; the gold paragraph must be retrieved. "
             "Embedder: all-MiniLM-L6-v2 (bf16 unless noted).", "",
             "| retriever | recall@1 | recall@5 | recall@10 | MRR |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['r@1']:.4f} | {m['r@5']:.4f} | {m['r@10']:.4f} | {m['mrr']:.4f} |")
    lat = out["latency_ms"]
    hybrid5 = rows["pocketlm hybrid"]["r@5"]
    lines += ["", f"Indexing: {out['chunks'] / out['index_s']:.1f} chunks/s end to end (read, chunk, embed, store). "
                  f"Embedding speed on paragraphs: bf16 {out['embed_bf16_per_s']:.0f}/s, fp32 {out['embed_fp32_per_s']:.0f}/s "
                  f"({out['embed_bf16_per_s'] / out['embed_fp32_per_s']:.1f}x). Queries: {out['query_embed_per_s']:.0f}/s.", "",
              f"Search latency over {out['latency_chunks']} chunks (300 queries, query embedding included):", "",
              "| mode | p50 ms | p95 ms |", "|---|---|---|"]
    lines += [f"| {m} | {p50:.1f} | {p95:.1f} |" for m, (p50, p95) in lat.items()]
    lines += ["", "Goals:",
              f"- hybrid recall@5 >= 0.92: {hybrid5:.4f} -> " + ("**met**" if hybrid5 >= 0.92 else "**not met**"),
              f"- p50 search latency <= 30 ms at ~10k chunks: hybrid {lat['hybrid'][0]:.1f} ms -> "
              + ("**met**" if lat["hybrid"][0] <= 30 else "**not met**")]
    if e2e:
        ratio = e2e["rag k=1"]["f1"] / max(e2e["closed-book"]["f1"], 1e-9)
        lines += [f"- default model with retrieval (k=1) >= 3x its closed-book F1: {e2e['rag k=1']['f1']:.3f} vs "
                  f"{e2e['closed-book']['f1']:.3f} ({ratio:.1f}x) -> " + ("**met**" if ratio >= 3 else "**not met**"), "",
                  f"End to end on {e2e['closed-book']['n']} fixed questions (seed 0), SmolLM2-135M-Instruct Q4_1 on "
                  "llama.cpp, greedy, 32 tokens, `ask`'s prompt (one worked example), SQuAD normalisation:", "",
                  "| setting | EM | F1 |", "|---|---|---|"]
        lines += [f"| {name} | {m['em']:.3f} | {m['f1']:.3f} |" for name, m in e2e.items()]
    else:
        lines.append("- end-to-end EM/F1: not run (--skip-e2e)")
    text = "\n".join(lines) + "\n"
    print(text)
    save_results(RESULTS, text)


if __name__ == "__main__":
    main()
