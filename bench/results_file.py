"""Committed results files: written whole (a killed benchmark leaves the last good file, not a
truncated one), and, for benchmarks run per model, one section per tag, so runs on different
models (or a rerun of one) replace their own section and keep the others and any text above them."""
from __future__ import annotations

from pathlib import Path

from pocketlm.util.atomic import write_text


def put_section(results: Path, title: str, tag: str, section: str) -> None:
    text = results.read_text() if results.exists() else f"# {title}\n\n"
    start = text.find(f"## {tag}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section.rstrip() + "\n" + ("" if end < 0 else text[end:])
    else:
        text = text.rstrip() + "\n\n" + section
    save_results(results, text)


def save_results(results: Path, text: str) -> None:
    write_text(results, text.rstrip() + "\n")
