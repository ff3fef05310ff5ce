"""`pocketlm ask`: retrieve, extract the sentence that answers, let the model pick a span of it, cite.

Two ways to answer, measured side by side in bench/rag_answers.py (default: extract):
- extract: the retrieved passages are cut into sentences and scored against the question
  (rag/extract.py); the best is quoted with its citation and the model answers with a run of
  its words, under a grammar that admits nothing else, so every word of the answer stands in
  the source it cites. When no sentence scores high enough the answer is "not in your
  documents", without asking the model at all.
- write: the earlier way, the passages numbered in the prompt and the model writing an answer
  with [n] citations, checked afterwards (a [n] that names no source is removed).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import PocketError
from .extract import answer_start, best_span, checked_span, content_words, score_sentences, span_candidates, span_grammar
from .index import inner_heading
from .retrieve import Hit, Retriever

STYLES = ("extract", "write")
# How style extract picks its span: "scored" asks the model how likely each admitted span is as
# the whole answer (the likeliest wins; a local llama.cpp model only), "greedy" lets it generate
# under the span grammar, one token at a time. Chosen on SQuAD dev questions other than the
# reported ones (seed 1, 60 questions: EM 0.417 / F1 0.499 scored, 0.267 / 0.356 greedy).
SPAN_CHOICES = ("scored", "greedy")
SPAN_CHOICE = "scored"
SYSTEM = ("You answer questions using only the numbered sources given. Cite the sources you use "
          "with their numbers in square brackets, like [1]. If the sources do not contain the "
          "answer, say that you do not know.")
REPEAT_PENALTY = 1.15  # greedy decoding of a 135M model loops without it
NOTHING_FOUND = "Not in your documents: nothing in the index answers this."
# all-MiniLM-L6-v2 on the bundled FAQ: off-topic questions reach 0.10-0.24 with their best
# passage, on-topic ones 0.7+. BM25 alone cannot gate: stop words match every chunk.
MIN_COSINE = 0.35
# The best sentence's score (extract.score_sentences) below which the documents are taken not to
# answer: set on SQuAD dev (bench/results/rag_answers.md, refusal table): at 0.65, 92% of questions
# about articles absent from the index were refused and 7% of answerable ones (0.55: 78% and 3.5%).
MIN_SENTENCE_SCORE = 0.65
# The short answer: at most this many words, none of them the question's own content words. Left
# free, the 135M model copied from the sentence's start (SQuAD sample: 14 words on average, the
# question restated; EM 0.05); SQuAD's answers are a few words that the question does not hold.
SPAN_WORDS = 10
QUOTE_WORDS = 80  # a longer "sentence" (a table, a run-on list) is cut: the span grammar stays small
# One worked exchange before the real question: a 135M model answers in a short phrase after
# it instead of restating the question (SQuAD sample, 30 questions, one source: F1 0.13 -> 0.18).
EXAMPLE = [
    {"role": "user", "content": "Sources:\n\n[1] (Eiffel Tower)\nThe Eiffel Tower is a wrought-iron lattice tower in "
                                "Paris. It was built for the 1889 World's Fair and was designed by the company of the "
                                "engineer Gustave Eiffel.\n\n[2] (Louvre)\nThe Louvre is the world's most-visited "
                                "museum.\n\nQuestion: Whose company designed the Eiffel Tower?"},
    {"role": "assistant", "content": "Gustave Eiffel's company [1]."},
]
SPAN_SYSTEM = "Answer with the fewest words of the source that answer the question, copied exactly."
# Two worked spans: a name and a number, the answers SQuAD-like questions most often want.
SPAN_EXAMPLES = [
    {"role": "user", "content": 'Source: "It was built for the 1889 World\'s Fair and was designed by the company of the '
                                'engineer Gustave Eiffel."\nQuestion: Whose company designed the Eiffel Tower?'},
    {"role": "assistant", "content": "the engineer Gustave Eiffel"},
    {"role": "user", "content": 'Source: "In 2019 the Louvre received 9.6 million visitors, more than any other museum."'
                                "\nQuestion: How many people visited the Louvre in 2019?"},
    {"role": "assistant", "content": "9.6 million"},
]


@dataclass
class Answer:
    text: str
    citations: list[dict] = field(default_factory=list)
    retrieval_ms: float = 0.0
    generation_ms: float = 0.0
    tokens: int = 0
    grounded: bool = True
    short: str = ""  # extract: the span alone, without its citation or quote

    def to_json(self) -> dict:
        return {"answer": self.text, "short": self.short, "citations": self.citations,
                "retrieval_ms": round(self.retrieval_ms, 1), "generation_ms": round(self.generation_ms, 1),
                "tokens": self.tokens}


def relevant(hits: list[Hit]) -> list[Hit]:
    """Hits close enough to the question in embedding space (outside the dense pool: not)."""
    return [h for h in hits if h.cosine is not None and h.cosine >= MIN_COSINE]


def build_messages(question: str, hits: list[Hit], fits: Callable[[list[dict]], bool]) -> tuple[list[dict], list[Hit]]:
    """Chat messages with as many of the best sources as fit the context (style write)."""
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


def citation_json(n: int, hit: Hit, quote: str | None = None) -> dict:
    snippet = quote or " ".join(hit.chunk.text.split())[:240]
    return {"n": n, "source": hit.chunk.path, "title": hit.chunk.title, "heading": hit.chunk.heading,
            "page": hit.chunk.page, "chunk_id": hit.chunk.id, "snippet": snippet}


@dataclass
class Prompt:
    """What generation needs for one grounded answer: the chat, the sources it cites, and for
    style extract the quoted sentence and the grammar of its spans. No hits: do not generate."""
    messages: list[dict]
    hits: list[Hit]
    retrieval_ms: float
    quote: str = ""
    grammar: str | None = None
    spans: list[tuple[int, str]] = field(default_factory=list)  # what the grammar admits

    def params(self) -> dict:
        """Sampling parameters this prompt needs beside the caller's."""
        if self.grammar is not None:
            return {"grammar": self.grammar}
        return {"repeat_penalty": REPEAT_PENALTY}


def prepare(question: str, retriever: Retriever, model, k: int = 5, mode: str = "hybrid",
            max_tokens: int = 256, style: str = "extract") -> Prompt:
    """Retrieve and build the prompt; no hits when nothing relevant was found (do not generate)."""
    if not question.strip():
        raise PocketError("the question is empty")
    if style not in STYLES:
        raise PocketError(f"unknown answer style {style!r} (choose one of {', '.join(STYLES)})")
    n_question = len(model.tokenize(question))
    if n_question + max_tokens + 64 > model.n_ctx:
        raise PocketError(f"the question has {n_question} tokens; with {max_tokens} for the answer it does not fit the "
                          f"model's context of {model.n_ctx}")
    hits = relevant(retriever.search(question, mode=mode, k=k))
    if not hits:
        return Prompt([], [], retriever.last_ms)

    def fits(messages):
        return model.count_chat_tokens(messages) + max_tokens <= model.n_ctx

    if style == "write":
        messages, hits = build_messages(question, hits, fits)
        return Prompt(messages, hits, retriever.last_ms)
    if retriever.embedder is None:
        raise PocketError("extracting answers needs the index's embedder")
    ranked = score_sentences(question, [h.chunk.text for h in hits], retriever.embedder.encode,
                             leads=[inner_heading(h.chunk.title, h.chunk.heading) for h in hits])
    if not ranked or ranked[0].score < MIN_SENTENCE_SCORE:
        return Prompt([], [], retriever.last_ms)
    best = ranked[0]
    def span_chat(quote: str) -> list[dict]:
        return [{"role": "system", "content": SPAN_SYSTEM}, *SPAN_EXAMPLES,
                {"role": "user", "content": f'Source: "{quote}"\nQuestion: {question}'}]

    quote = " ".join(best.text.split()[:QUOTE_WORDS])
    while not fits(span_chat(quote)) and len(quote.split()) > 8:  # a small context: a shorter quote
        quote = " ".join(quote.split()[: len(quote.split()) // 2])
    avoid, starts = content_words(question), answer_start(question)
    return Prompt(span_chat(quote), [hits[best.hit]], retriever.last_ms, quote, span_grammar(quote, avoid, SPAN_WORDS, starts),
                  span_candidates(quote, avoid, SPAN_WORDS, starts))


def finish(raw: str, prompt: Prompt) -> tuple[str, list[dict], str]:
    """(answer with its citations, the citations to show, the short answer alone)."""
    hits = prompt.hits
    if prompt.grammar is not None:
        # An engine that ignored the grammar (a remote one) may have written anything: then the
        # quote alone answers, and nothing unchecked is shown as the source's words.
        span = checked_span(raw, prompt.quote)
        quoted = f'From [1]: "{prompt.quote}"'
        return (f"{span} [1]\n\n{quoted}" if span else quoted), [citation_json(1, hits[0], prompt.quote)], span
    text, cited = check_citations(raw, hits)
    citations = [citation_json(n, hits[n - 1]) for n in cited]
    if not citations:  # the model cited nothing: still show what it was given, marked as such
        citations = [{**citation_json(n, h), "cited": False} for n, h in enumerate(hits, 1)]
    return text, citations, re.sub(r"\s*\[\d+\]", "", text)


def ask(question: str, retriever: Retriever, model, k: int = 5, mode: str = "hybrid", max_tokens: int = 256,
        on_text: Callable[[str], None] | None = None, style: str = "extract", span_choice: str = SPAN_CHOICE) -> Answer:
    if span_choice not in SPAN_CHOICES:
        raise PocketError(f"unknown span choice {span_choice!r} (choose one of {', '.join(SPAN_CHOICES)})")
    prompt = prepare(question, retriever, model, k, mode, max_tokens, style)
    if not prompt.hits:
        if on_text:
            on_text(NOTHING_FOUND)
        return Answer(NOTHING_FOUND, [], prompt.retrieval_ms, 0.0, 0, grounded=False)
    t0 = time.perf_counter()
    scorer = None
    if prompt.spans and span_choice == "scored" and hasattr(model, "continuation_scorer"):
        scorer = model.continuation_scorer(prompt.messages)  # None: no chat template, generate instead
    if scorer is not None:
        raw = best_span(prompt.spans, model.tokenize, scorer)[0]
    else:
        pieces = []
        for piece in model.chat(prompt.messages, max_tokens=max_tokens, temperature=0.0, seed=0, **prompt.params()):
            pieces.append(piece)
            if on_text and prompt.grammar is None:
                on_text(piece)
        raw = "".join(pieces)
    generation_ms = 1000 * (time.perf_counter() - t0)
    text, citations, short = finish(raw, prompt)
    if on_text and prompt.grammar is not None:  # the span is checked before it is shown
        on_text(text)
    return Answer(text, citations, prompt.retrieval_ms, generation_ms, len(model.tokenize(raw)), short=short)


def _where(hit: Hit) -> str:
    c = hit.chunk
    where = c.heading if c.heading.startswith(c.title or "\0") else " > ".join(x for x in (c.title, c.heading) if x)
    return f"({where}{f', page {c.page}' if c.page else ''})"
