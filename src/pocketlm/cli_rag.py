"""The document commands: index, search, ask (registered on the main group in cli.py)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_common import DB, POSITIVE, THREADS, json_option, json_target, user_errors
from .models.registry import DEFAULT_MODEL
from .util.machine import usable_cores


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--db", required=True, type=DB, help="The index: an SQLite file, or a postgresql:// URL (pgvector).")
@click.option("--embedder", default=None, help="all-minilm-l6-v2 (default) or a sentence-transformers folder.")
@click.option("--chunk-tokens", default=256, show_default=True, type=click.IntRange(min=16))
@click.option("--overlap", default=32, show_default=True, type=click.IntRange(min=0))
@click.option("--int8", is_flag=True, help="Store vectors as int8 with a scale (4x smaller).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def index(paths, db, embedder, chunk_tokens, overlap, int8, quiet):
    """Index documents (.txt .md .rst .html .pdf .docx) for search and ask."""
    from .rag.index import index_paths

    r = index_paths([str(p) for p in paths], db, embedder, chunk_tokens, overlap, int8, progress=not quiet)
    for path, why in r.skipped:
        click.echo(f"skipped {path}: {why}", err=True)
    for path, what in r.notes:
        click.echo(f"note: {path}: {what}", err=True)
    click.echo(f"{db}: {r.added} added, {r.updated} updated, {r.unchanged} unchanged, {r.removed} removed, "
               f"{r.chunks} chunks embedded in {r.seconds:.1f} s")


@click.command()
@click.argument("query")
@click.option("--db", required=True, type=DB, help="The index: an SQLite file or a postgresql:// URL.")
@click.option("--mode", default="hybrid", show_default=True, type=click.Choice(["bm25", "dense", "hybrid"]))
@click.option("--k", default=5, show_default=True, type=POSITIVE, help="Passages retrieved.")
@json_option
@user_errors
def search(query, db, mode, k, as_json):
    """Search the index: BM25, dense or hybrid (reciprocal-rank fusion)."""
    from .rag.answer import citation_json
    from .rag.retrieve import open_retriever

    as_json = json_target(as_json, None)[0]
    retriever = open_retriever(db, mode != "bm25")
    hits = retriever.search(query, mode=mode, k=k)
    if as_json:
        click.echo(json.dumps({"hits": [{**citation_json(i, h), "score": h.score} for i, h in enumerate(hits, 1)],
                               "retrieval_ms": round(retriever.last_ms, 1)}, indent=1))
        return
    for i, h in enumerate(hits, 1):
        where = h.chunk.heading or h.chunk.title
        click.echo(f"[{i}] {h.score:.4f}  {h.chunk.path}" + (f" (page {h.chunk.page})" if h.chunk.page else "")
                   + f"\n    {where}\n    {' '.join(h.chunk.text.split())[:200]}")
    if not hits:
        click.echo("no matches")


@click.command()
@click.argument("question")
@click.option("--db", required=True, type=DB, help="The index: an SQLite file or a postgresql:// URL.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--k", default=5, show_default=True, type=POSITIVE, help="Passages retrieved.")
@click.option("--mode", default="hybrid", show_default=True, type=click.Choice(["bm25", "dense", "hybrid"]))
@click.option("--style", default="extract", show_default=True, type=click.Choice(["extract", "write"]),
              help="extract: quote the sentence that answers and a span of it; write: the model writes, citing [n].")
@click.option("--max-tokens", default=256, show_default=True, type=POSITIVE, help="Most tokens generated per answer.")
@click.option("--ctx", default=2048, show_default=True, type=click.IntRange(min=16))
@THREADS
@json_option
@user_errors
def ask(question, db, model, k, mode, style, max_tokens, ctx, threads, as_json):
    """Answer QUESTION from the indexed documents with the local model, citing sources."""
    from .models.export_gguf import cached_gguf
    from .rag.answer import ask as run_ask
    from .rag.retrieve import open_retriever
    from .runtime.llama_cpp_backend import LlamaCppModel

    as_json = json_target(as_json, None)[0]
    retriever = open_retriever(db, True)
    llm = LlamaCppModel(cached_gguf(model, "f16"), n_ctx=ctx, n_threads=threads or usable_cores())
    stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
    answer = run_ask(question, retriever, llm, k=k, mode=mode, max_tokens=max_tokens, on_text=stream, style=style)
    if as_json:
        click.echo(json.dumps(answer.to_json(), indent=1))
        return
    click.echo("\n")
    for c in answer.citations:
        mark = "" if c.get("cited", True) else " (retrieved, not cited)"
        click.echo(f"[{c['n']}] {c['source']}" + (f" (page {c['page']})" if c["page"] else "")
                   + (f" - {c['heading']}" if c["heading"] else "") + mark)
