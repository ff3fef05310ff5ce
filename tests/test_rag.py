"""RAG: structured loading, chunking, the incremental index, retrieval, citation checks."""
import json

import pytest
from click.testing import CliRunner
from fuzz_harness import one_page_pdf

import pocketlm.rag.index as index_mod
from pocketlm.cli import cli
from pocketlm.errors import PocketError
from pocketlm.rag.answer import NOTHING_FOUND, ask
from pocketlm.rag.chunking import chunk_document
from pocketlm.rag.embedder import Embedder
from pocketlm.rag.index import index_paths
from pocketlm.rag.loaders import load_document
from pocketlm.rag.retrieve import Retriever
from pocketlm.rag.store import Store

DOCS = {
    "volcano.md": "# Volcanoes\n\nA volcano is a rupture in the crust of a planet.\n\n## Lava\n\n"
                  "Molten rock that reaches the surface is called lava. Basalt lava flows are very fluid.\n",
    "bread.rst": "Baking bread\n============\n\nBread needs flour, water, salt and yeast.\n\n"
                 "Proofing\n--------\n\nLet the dough rise for two hours in a warm place until it doubles.\n",
    "chess.html": "<html><body><h1>Chess</h1><p>The bishop moves diagonally.</p><h2>Castling</h2>"
                  "<p>Castling moves the king two squares towards a rook.</p></body></html>",
}


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def test_structure_of_markdown_rst_and_html(corpus):
    md = load_document(corpus / "volcano.md")
    assert md.title == "Volcanoes" and [s.heading for s in md.sections] == ["Volcanoes", "Volcanoes > Lava"]
    rst = load_document(corpus / "bread.rst")
    assert [s.heading for s in rst.sections] == ["Baking bread", "Baking bread > Proofing"]
    assert "two hours" in rst.sections[1].text
    page = load_document(corpus / "chess.html")
    assert [s.heading for s in page.sections] == ["Chess", "Chess > Castling"]


def test_docx_and_pdf_and_encrypted_pdf(tmp_path):
    import docx
    from pypdf import PdfWriter

    d = docx.Document()
    d.add_heading("Manual", 1)
    d.add_paragraph("Press the red button to start.")
    d.add_heading("Safety", 2)
    d.add_paragraph("Wear gloves.")
    d.save(tmp_path / "m.docx")
    doc = load_document(tmp_path / "m.docx")
    assert [s.heading for s in doc.sections] == ["Manual", "Manual > Safety"] and "red button" in doc.sections[0].text

    (tmp_path / "p.pdf").write_bytes(one_page_pdf("Hello from page one"))
    pdf = load_document(tmp_path / "p.pdf")
    assert pdf.sections[0].page == 1 and "Hello from page one" in pdf.sections[0].text

    w = PdfWriter()
    w.add_blank_page(100, 100)
    w.encrypt("secret")
    with open(tmp_path / "locked.pdf", "wb") as f:
        w.write(f)
    with pytest.raises(PocketError, match="encrypted"):
        load_document(tmp_path / "locked.pdf")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 nothing here")
    with pytest.raises(PocketError, match="PDF"):
        load_document(tmp_path / "broken.pdf")


def test_chunks_fit_the_budget_and_overlap(corpus, embedder):
    text = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(200))
    (corpus / "long.txt").write_text(text)
    chunks = chunk_document(load_document(corpus / "long.txt"), 64, 16, embedder.count_tokens)
    assert len(chunks) > 5
    assert all(embedder.count_tokens(c.text) <= 64 for c in chunks)
    for a, b in zip(chunks, chunks[1:]):  # consecutive chunks share their boundary sentences
        assert a.text.split("\n\n")[-1] in b.text


def test_index_is_incremental_and_consistent(corpus, embedder, tmp_path):
    db = tmp_path / "i.db"
    r = index_paths([corpus], db, embedder=embedder, progress=False)
    assert (r.added, r.unchanged) == (3, 0) and r.chunks >= 4
    r = index_paths([corpus], db, embedder=embedder, progress=False)
    assert (r.added, r.updated, r.unchanged, r.chunks) == (0, 0, 3, 0)
    (corpus / "bread.rst").write_text(DOCS["bread.rst"].replace("two hours", "ninety minutes"))
    (corpus / "chess.html").unlink()
    r = index_paths([corpus], db, embedder=embedder, progress=False)
    assert (r.updated, r.removed, r.unchanged) == (1, 1, 1)
    store = Store(db)
    assert store.counts()[0] == 2
    assert store.search_text("castling bishop", 5) == []  # the deleted file's chunks left FTS too
    assert store.search_text("ninety", 5) and not store.search_text("hours", 5)


def test_interrupted_index_run_is_finished_by_the_next(corpus, embedder, tmp_path, monkeypatch):
    db = tmp_path / "i.db"
    real = embedder.encode
    calls = []

    def fail_second(texts, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(texts, **kw)

    monkeypatch.setattr(embedder, "encode", fail_second)
    monkeypatch.setattr(index_mod, "EMBED_BATCH", 1)  # one file per embedding call
    with pytest.raises(KeyboardInterrupt):
        index_paths([corpus], db, embedder=embedder, progress=False)
    monkeypatch.setattr(embedder, "encode", real)
    assert Store(db).counts()[0] == 1
    r = index_paths([corpus], db, embedder=embedder, progress=False)
    assert (r.added, r.unchanged) == (2, 1)


def test_another_embedder_or_chunk_size_is_refused(corpus, embedder, tmp_path):
    db = tmp_path / "i.db"
    index_paths([corpus], db, embedder=embedder, progress=False)
    with pytest.raises(PocketError, match="rebuild"):
        index_paths([corpus], db, embedder=embedder, chunk_tokens=128, progress=False)
    store = Store(db)
    store.set_meta(embedder="other-model:768:abc", embedder_name="other-model")
    with pytest.raises(PocketError, match="other-model"):
        index_paths([corpus], db, embedder=embedder, progress=False)


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_search_finds_the_right_passage(corpus, embedder, tmp_path, mode):
    db = tmp_path / "i.db"
    index_paths([corpus], db, embedder=embedder, progress=False)
    retriever = Retriever(Store(db), embedder)
    for query, doc, heading in (("how long should dough rise", "bread.rst", "Proofing"),
                                ("what is molten rock at the surface called", "volcano.md", "Lava"),
                                ("how does the king castle", "chess.html", "Castling")):
        top = retriever.search(query, mode=mode, k=3)[0].chunk
        assert top.path.endswith(doc) and top.heading.endswith(heading), (mode, query, top)


class MockModel:
    """Stands in for llama.cpp: counts tokens as words and replies with a canned answer."""
    n_ctx = 2048

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def tokenize(self, text):
        return text.split()

    def count_chat_tokens(self, messages):
        return sum(len(m["content"].split()) for m in messages)

    def chat(self, messages, **kw):
        self.calls.append(messages)
        yield from self.reply.split(" ")


def test_citations_are_checked_and_irrelevant_questions_are_not_answered(corpus, embedder, tmp_path):
    db = tmp_path / "i.db"
    index_paths([corpus], db, embedder=embedder, progress=False)
    retriever = Retriever(Store(db), embedder)
    model = MockModel("Let it rise two hours [1] in a warm place [9].")
    answer = ask("How long should bread dough rise?", retriever, model, k=3, style="write")
    assert "[9]" not in answer.text and "[1]" in answer.text
    assert [c["n"] for c in answer.citations] == [1] and answer.citations[0]["source"].endswith("bread.rst")
    assert "Sources:" in model.calls[0][-1]["content"] and "[1] (Baking bread > Proofing)" in model.calls[0][-1]["content"]
    silent = MockModel("should not be called")
    nothing = ask("Who won the 1998 football world cup final?", retriever, silent, k=3, style="write")
    assert nothing.text == NOTHING_FOUND and not silent.calls
    with pytest.raises(PocketError, match="does not fit"):
        ask("word " * 3000, retriever, MockModel("x"), k=3)


def test_index_and_search_commands(corpus, tmp_path):
    db = tmp_path / "cli.db"
    runner = CliRunner()
    res = runner.invoke(cli, ["index", str(corpus), "--db", str(db)])
    assert res.exit_code == 0 and "3 added" in res.output, res.output
    res = runner.invoke(cli, ["search", "basalt lava", "--db", str(db), "--json", "--mode", "bm25"])
    hits = json.loads(res.output)["hits"]
    assert hits[0]["source"].endswith("volcano.md") and hits[0]["heading"] == "Volcanoes > Lava"
    res = runner.invoke(cli, ["search", "x", "--db", str(tmp_path / "none.db")])
    assert res.exit_code == 1 and "no index" in res.output
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    res = runner.invoke(cli, ["index", str(tmp_path / "bin.txt"), "--db", str(db)])
    assert res.exit_code == 0 and "skipped" in res.output and "binary" in res.output


def test_careless_inputs_are_named_not_silently_dropped(corpus, embedder, tmp_path):
    import sqlite3

    (corpus / "loop-a.md").symlink_to(corpus / "loop-b.md")
    (corpus / "loop-b.md").symlink_to(corpus / "loop-a.md")
    prose = "The mill by the river grinds wheat into flour for the bakery. " * 20
    (corpus / "stray.txt").write_bytes(prose.encode()[:600] + b"\xe9" + prose.encode()[600:])  # one Latin-1 byte
    (corpus / "latin1.txt").write_bytes("Café crème, déjà vu à Noël.".encode("latin-1"))  # not UTF-8 at all
    db = tmp_path / "new" / "folder" / "i.db"  # missing folders are made for a new index
    report = index_paths([corpus], db, embedder=embedder, progress=False)
    skipped = dict(report.skipped)
    assert skipped[str(corpus / "loop-a.md")] == skipped[str(corpus / "loop-b.md")] == "a broken symlink or a symlink loop"
    assert "is not UTF-8 text (" in skipped[str(corpus / "latin1.txt")]
    assert report.notes == [(str(corpus / "stray.txt"), "1 byte that is not UTF-8 replaced by \ufffd")]
    assert report.added == 4  # the three documents and the repaired one
    retriever = Retriever(Store(db), embedder)
    with pytest.raises(PocketError, match="the query is empty"):
        retriever.search("  \n ", k=3)
    foreign = tmp_path / "notes.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.commit()
    con.close()
    with pytest.raises(PocketError, match="database of something else"):
        index_paths([corpus], foreign, embedder=embedder, progress=False)
    tables = sqlite3.connect(foreign).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("notes",)]  # untouched
