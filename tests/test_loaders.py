"""Document loaders shared by distillation and RAG."""
import pytest

from pocketlm.errors import PocketError
from pocketlm.rag.loaders import find_documents, read_document


def test_folders_yield_supported_files_in_order(tmp_path):
    (tmp_path / "b.md").write_text("# B")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.rst.txt").write_text("A")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00")
    (tmp_path / ".hidden.txt").write_text("no")
    assert [p.name for p in find_documents([tmp_path])] == ["b.md", "a.rst.txt"]
    with pytest.raises(PocketError, match="no such file"):
        find_documents([tmp_path / "missing"])


def test_html_keeps_text_and_drops_scripts(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<html><head><title>T</title><script>var x = 1;</script></head>"
                    "<body><h1>Title</h1><p>First &amp; second.</p><style>p {}</style><p>Third</p></body></html>")
    text = read_document(page)
    assert "First & second." in text and "Third" in text and "Title" in text
    assert "var x" not in text and "p {}" not in text


def test_binary_and_undecodable_files_are_refused(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(PocketError, match="binary"):
        read_document(tmp_path / "bin.txt")
    with pytest.raises(PocketError, match="UTF-8"):
        read_document(tmp_path / "latin.txt")
