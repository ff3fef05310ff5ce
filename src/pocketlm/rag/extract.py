"""Extract first: the sentence that answers, then a short answer that is a span of it.

A 135M model cannot be trusted to write from sources (bench/results/rag_squad.md: F1 0.14 when
it writes, restating the question), but it can be trusted to pick. So the retrieved passages
are cut into sentences, every sentence is scored against the question (its embedding's cosine
plus the share of the question's content words it holds), the best one is quoted with its
citation, and the model then chooses a span of that quote under a grammar that admits nothing
else. No cross-encoder installs offline here; scoring sentences, not 256-token chunks, is the
reranking step (what it gains is measured in bench/rag_squad.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he her
here hers him his how i if in into is it its itself just me more most my no nor not of off on once only or other our out
over own same she should so some such than that the their theirs them then there these they this those through to too
under until up very was we were what when where which while who whom why will with would you your yours""".split())
# The share of the question's content words a sentence holds counts this much beside its cosine:
# chosen on SQuAD dev (bench/rag_squad.py, "sentence" rows), where names and numbers the
# embedder blurs decide which sentence holds the answer.
LEXICAL_WEIGHT = 0.5
# The share of the question's content words in the heading a sentence sits under (FAQ-like
# documents, where the heading is the question), counted apart from the sentence's own: on the
# bundled Python FAQ 0.25 lets the heading pick the entry and the sentence's words pick within it.
HEADING_WEIGHT = 0.25
# Sentences of lower-ranked passages pay this much per rank below the first: retrieval's
# fused ranking already weighed the whole passage.
RANK_PENALTY = 0.02


@dataclass
class Sentence:
    hit: int  # index of the passage it came from, in retrieval order
    text: str
    score: float = 0.0


def content_words(text: str) -> set[str]:
    """Lower-case words without stop words, a plural 's' dropped (the crudest stemmer that helps)."""
    out = set()
    for w in re.findall(r"\w+", text.lower()):
        if w in STOPWORDS:
            continue
        out.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(r"\b(?:e\.g|i\.e|etc|vs|Mr|Mrs|Ms|Dr|St|No|Fig|cf)\.$")


def sentences(text: str) -> list[str]:
    """Sentences of a passage. A paragraph that ends in ':' leads into the next (a code block or
    a list in docs), so the two stay one sentence; known abbreviations do not end one."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    merged: list[str] = []
    for p in paragraphs:
        if merged and merged[-1].endswith(":"):
            merged[-1] = f"{merged[-1].rstrip(':').rstrip()}: {p}"
        else:
            merged.append(p)
    out: list[str] = []
    for p in merged:
        start = 0
        for m in _SENTENCE_END.finditer(p):
            if _ABBREVIATION.search(p[start:m.start()]):
                continue
            out.append(p[start:m.start()].strip())
            start = m.end()
        out.append(p[start:].strip())
    return [s for s in out if re.search(r"\w", s)]


def score_sentences(question: str, passages: list[str], embed, lexical_weight: float = LEXICAL_WEIGHT,
                    leads: list[str] | None = None) -> list[Sentence]:
    """Every sentence of the passages, best first. `embed(texts) -> (n, d)` normalised rows.
    leads: per passage, the innermost heading its sentences are read under (as the index embeds
    chunks): in a FAQ the question asked is often the heading, not any sentence below it."""
    found = [Sentence(i, s) for i, p in enumerate(passages) for s in sentences(p)]
    if not found:
        return []
    vectors = np.asarray(embed([question] + [s.text for s in found]), dtype=np.float32)
    cosines = vectors[1:] @ vectors[0]
    asked = content_words(question)
    # The heading counts apart, and less: it tells which passage answers, the sentence's own words
    # which of its sentences does (heading and sentence embedded together, or their words pooled,
    # the heading's match outweighed every difference between the sentences under it).
    heads = [content_words(lead) for lead in leads] if leads else [set()] * len(passages)
    for s, cos in zip(found, cosines):
        own = len(asked & content_words(s.text)) / len(asked) if asked else 0.0
        head = len(asked & heads[s.hit]) / len(asked) if asked else 0.0
        s.score = float(cos) + lexical_weight * own + HEADING_WEIGHT * head - RANK_PENALTY * s.hit
    return sorted(found, key=lambda s: -s.score)


def _literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + re.sub(r"[\x00-\x1f]", lambda m: f"\\x{ord(m.group()):02x}", escaped) + '"'


_PUNCT = ".,;:!?\"')]"


def _span_plan(words: list[str], avoid, max_words: int, starts) -> tuple[list[bool], int, list[int]]:
    """(which words a span may hold, the most words it may have, the words it may begin at): the
    one rule behind both span_grammar and span_candidates."""
    usable = [not (content_words(w) & set(avoid)) for w in words]
    if not any(usable):  # every word is a question word: any run rather than none
        usable = [True] * len(words)
    cap = max_words or len(words)
    first = [i for i in range(len(words)) if usable[i] and (starts is None or starts(words[i]))]
    first = first or [i for i in range(len(words)) if usable[i]]  # no word of the wanted kind: any start
    return usable, cap, first


def span_grammar(quote: str, avoid: set[str] | frozenset[str] = frozenset(), max_words: int = 0,
                 starts: Callable[[str], bool] | None = None) -> str:
    """GBNF that admits exactly the contiguous runs of whole words of `quote` (a word's trailing
    punctuation may be dropped where the run ends) holding none of the words in `avoid` (content
    words, as content_words gives them) and at most `max_words` words (0: any number), beginning
    at a word `starts` accepts (the answer's expected kind, answer_start). Rule
    w{i}-{k}: a run from word i with at most k words, continuing into w{i+1}-{k-1}; so the grammar
    grows with the quote's length times max_words, not with its number of spans."""
    words = quote.split()
    if not words:
        raise ValueError("an empty quote has no spans")
    usable, cap, first = _span_plan(words, avoid, max_words, starts)
    rules = ["root ::= " + " | ".join(f"w{i}-{cap}" for i in first)]
    todo, made = [(i, cap) for i in first], set()
    while todo:
        i, k = todo.pop()
        if (i, k) in made:
            continue
        made.add((i, k))
        word = words[i]
        core = word.rstrip(_PUNCT) or word
        tail = word[len(core):]
        if k > 1 and i + 1 < len(words) and usable[i + 1]:
            rules.append(f"w{i}-{k} ::= {_literal(core)} ({_literal(tail + ' ')} w{i + 1}-{k - 1})?")
            todo.append((i + 1, k - 1))
        else:
            rules.append(f"w{i}-{k} ::= {_literal(core)}" + (f" {_literal(tail)}?" if tail else ""))
    return "\n".join(rules) + "\n"


def span_candidates(quote: str, avoid: set[str] | frozenset[str] = frozenset(), max_words: int = 0,
                    starts: Callable[[str], bool] | None = None) -> list[tuple[int, str]]:
    """Every text span_grammar admits for the same arguments, as (first word's index, text)."""
    words = quote.split()
    usable, cap, first = _span_plan(words, avoid, max_words, starts)
    out = []
    for i in first:
        j = i
        while j < len(words) and j - i < cap and (j == i or usable[j]):
            head = " ".join(words[i:j])
            core = words[j].rstrip(_PUNCT) or words[j]
            for last in dict.fromkeys((core, words[j])):  # the final word with and without its punctuation
                out.append((i, f"{head} {last}" if head else last))
            j += 1
    return out


def best_span(candidates: list[tuple[int, str]], tokenize: Callable[[str], list[int]],
              score_runs: Callable) -> tuple[str, float]:
    """The candidate the model finds likeliest as the whole answer: the log-prob of its tokens plus
    that of the answer ending after them (so a span that stops mid-phrase pays for it). Spans from
    one first word share a decode: each is scored inside the longest run from that word whenever
    its tokens are a prefix of the run's (true at word boundaries for BPE vocabularies); any other
    is decoded on its own. `score_runs(runs)` -> per run (token log-probs, end log-probs), as
    LlamaCppModel.score_runs gives them for a fixed prompt. (Scoring only the 8 first words whose
    first token is likeliest saved no time on SQuAD: few quotes have more.)"""
    longest: dict[int, str] = {}
    for i, text in candidates:
        if len(text) > len(longest.get(i, "")):
            longest[i] = text
    runs = [tokenize(t) for t in longest.values()]
    slot = {i: n for n, i in enumerate(longest)}
    placed = []  # (run, tokens of it) per candidate
    for i, text in candidates:
        tokens = tokenize(text)
        if tokens and runs[slot[i]][:len(tokens)] == tokens:
            placed.append((slot[i], len(tokens)))
        else:
            placed.append((len(runs), len(tokens)))
            runs.append(tokens)
    scored = score_runs(runs)
    totals = [float(scored[r][0][:n].sum() + scored[r][1][n]) for r, n in placed]
    k = max(range(len(candidates)), key=totals.__getitem__)
    return candidates[k][1], totals[k]


def is_span(answer: str, quote: str) -> bool:
    """Whether `answer` is a run of whole words of `quote` (whitespace-insensitive): the check that
    holds an engine which ignored the grammar to its source."""
    a, q = answer.split(), quote.split()
    if not a:
        return False
    for i in range(len(q) - len(a) + 1):
        window = q[i:i + len(a)]
        if window[:-1] == a[:-1] and (window[-1] == a[-1] or window[-1].rstrip(".,;:!?\"')]") == a[-1]):
            return True
    return False


def checked_span(answer: str, quote: str) -> str:
    """The answer when it is a span of the quote; without its last word when only that word is
    cut short (generation stopped at max_tokens mid-word, within the grammar); else ""."""
    words = answer.split()
    for n in (len(words), len(words) - 1):
        if n > 0 and is_span(" ".join(words[:n]), quote):
            return " ".join(words[:n])
    return ""


_NUMBER_WORDS = frozenset("one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred "
                          "thousand million billion half dozen several".split())
_ASKS_NUMBER = re.compile(r"^\s*(how (many|much|old|long|far|large|big|tall|high)|what (year|percentage|percent|"
                          r"amount|number|age)|when|in what year|what (day|date|time)|how often)\b", re.I)
_ASKS_NAME = re.compile(r"^\s*(who|whom|whose)\b", re.I)


def answer_start(question: str) -> Callable[[str], bool] | None:
    """What word the short answer should begin at, from the question's kind (the classic answer-type
    rule of extractive QA): a number for how many / when / what year, a capitalised word for who;
    None for any other question. Left to itself the 135M model starts at the sentence's first word."""
    if _ASKS_NUMBER.search(question):
        return lambda w: any(c.isdigit() for c in w) or w.lower().strip(".,;:()$£€") in _NUMBER_WORDS or w[:1] in "$£€"
    if _ASKS_NAME.search(question):  # a capitalised word that is not just a sentence's first "The"
        return lambda w: w[:1].isupper() and w.lower() not in STOPWORDS
    return None
