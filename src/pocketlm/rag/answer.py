"""`pocketlm ask`: retrieve, prompt with numbered sources, generate locally, check citations.

Citations are verified after generation: a [n] that names no retrieved source is removed
from the answer, and the sources returned are exactly those the answer cites (or, when it
cites none, the retrieved ones, marked as uncited). When retrieval finds nothing that
matches the question, the model is not asked at all: an answer it cannot ground would be
invented.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import PocketError
from .retrieve import Hit, Retriever

SYSTEM = ("You answer questions using only the numbered sources given. Cite the sources you use "
          "with their numbers in square brackets, like [1]. If the sources do not contain the "
          "answer, say that you do not know.")
REPEAT_PENALTY = 1.15  # greedy decoding of a 135M model loops without it
NOTHING_FOUND = "I could not find anything about this in the indexed documents."
# all-MiniLM-L6-v2 on the bundled FAQ: off-topic questions reach 0.10-0.24 with their best
# passage, on-topic ones 0.7+. BM25 alone cannot gate: stop words match every chunk.
MIN_COSINE = 0.35
# One worked exchange before the real question: a 135M model answers in a short phrase after
# it instead of restating the question (SQuAD sample, 30 questions, one source: F1 0.13 -> 0.18).
EXAMPLE = [
    {"role": "user", "content": "Sources:\n\n[1] (Eiffel Tower)\nThe Eiffel Tower is a wrought-iron lattice tower in "
                                "Paris. It was built for the 1889 World's Fair and was designed by the company of the "
                                "engineer Gustave Eiffel.\n\n[2] (Louvre)\nThe Louvre is the world's most-visited "
                                "museum.\n\nQuestion: Whose company designed the Eiffel Tower?"},
    {"role": "assistant", "content": "Gustave Eiffel's company [1]."},
]


@dataclass
class Answer:
    text: str
    citations: list[dict] = field(default_factory=list)
    retrieval_ms: float = 0.0
    generation_ms: float = 0.0
    tokens: int = 0
    grounded: bool = True

    def to_json(self) -> dict:
        return {"answer": self.text, "citations": self.citations, "retrieval_ms": round(self.retrieval_ms, 1),
                "generation_ms": round(self.generation_ms, 1), "tokens": self.tokens}


def relevant(hits: list[Hit]) -> list[Hit]:
    """Hits close enough to the question in embedding space (outside the dense pool: not)."""
    return [h for h in hits if h.cosine is not None and h.cosine >= MIN_COSINE]


def build_messages(question: str, hits: list[Hit], fits: Callable[[list[dict]], bool]) -> tuple[list[dict], list[Hit]]:
    """Chat messages with as many of the best sources as fit the context."""
    kept = list(hits)
    while True:
        sources = "\n\n".join(f"[{i}] {_where(h)}\n{h.chunk.text}" for i, h in enumerate(kept, 1))
        messages = [{"role": "system", "content": SYSTEM}, *EXAMPLE,
                    {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"}]
        if fits(messages) or not kept:
            return messages, kept
        kept.pop()


def check_citations(text: str, hits: list[Hit]) -> tuple[str, list[int]]:
    """(answer with invalid [n] removed, the valid numbers cited, in order of first use)."""
    cited: list[int] = []

    def keep(m):
        n = int(m.group(1))
        if 1 <= n <= len(hits):
            if n not in cited:
                cited.append(n)
            return m.group(0)
        return ""

    cleaned = re.sub(r"\[(\d+)\]", keep, text)
    return re.sub(r"[ \t]+([.,;:])", r"\1", cleaned).strip(), cited


def citation_json(n: int, hit: Hit) -> dict:
    snippet = " ".join(hit.chunk.text.split())
    return {"n": n, "source": hit.chunk.path, "title": hit.chunk.title, "heading": hit.chunk.heading,
            "page": hit.chunk.page, "chunk_id": hit.chunk.id, "snippet": snippet[:240]}


@dataclass
class Prompt:
    """What generation needs for one grounded answer: the chat and the sources it numbers."""
    messages: list[dict]
    hits: list[Hit]
    retrieval_ms: float


def prepare(question: str, retriever: Retriever, model, k: int = 5, mode: str = "hybrid",
            max_tokens: int = 256) -> Prompt:
    """Retrieve and build the prompt; no hits when nothing relevant was found (do not generate)."""
    if not question.strip():
        raise PocketError("the question is empty")
    n_question = len(model.tokenize(question))
    if n_question + max_tokens + 64 > model.n_ctx:
        raise PocketError(f"the question has {n_question} tokens; with {max_tokens} for the answer it does not fit the "
                          f"model's context of {model.n_ctx}")
    hits = relevant(retriever.search(question, mode=mode, k=k))
    if not hits:
        return Prompt([], [], retriever.last_ms)

    def fits(messages):
        return model.count_chat_tokens(messages) + max_tokens <= model.n_ctx

    messages, hits = build_messages(question, hits, fits)
    return Prompt(messages, hits, retriever.last_ms)


def finish(raw: str, hits: list[Hit]) -> tuple[str, list[dict]]:
    """(answer with invalid citations removed, the citations to show)."""
    text, cited = check_citations(raw, hits)
    citations = [citation_json(n, hits[n - 1]) for n in cited]
    if not citations:  # the model cited nothing: still show what it was given, marked as such
        citations = [{**citation_json(n, h), "cited": False} for n, h in enumerate(hits, 1)]
    return text, citations


def ask(question: str, retriever: Retriever, model, k: int = 5, mode: str = "hybrid", max_tokens: int = 256,
        on_text: Callable[[str], None] | None = None) -> Answer:
    prompt = prepare(question, retriever, model, k, mode, max_tokens)
    if not prompt.hits:
        if on_text:
            on_text(NOTHING_FOUND)
        return Answer(NOTHING_FOUND, [], prompt.retrieval_ms, 0.0, 0, grounded=False)
    t0 = time.perf_counter()
    pieces = []
    for piece in model.chat(prompt.messages, max_tokens=max_tokens, temperature=0.0, seed=0,
                            repeat_penalty=REPEAT_PENALTY):
        pieces.append(piece)
        if on_text:
            on_text(piece)
    generation_ms = 1000 * (time.perf_counter() - t0)
    raw = "".join(pieces)
    text, citations = finish(raw, prompt.hits)
    return Answer(text, citations, prompt.retrieval_ms, generation_ms, len(model.tokenize(raw)))


def _where(hit: Hit) -> str:
    c = hit.chunk
    where = c.heading if c.heading.startswith(c.title or "\0") else " > ".join(x for x in (c.title, c.heading) if x)
    return f"({where}{f', page {c.page}' if c.page else ''})"
