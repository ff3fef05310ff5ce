"""MMLU, 0-shot: the answer is the letter (A-D) whose next-token logit is highest."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import PocketError

LETTERS = "ABCD"


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """Questions with a valid answer, subject-stratified when `limit` is set: round-robin over
    subjects in sorted order, each in file order, so any limit keeps subjects balanced and
    the same limit always picks the same questions."""
    path = Path(path)
    if not path.is_file():
        raise PocketError(f"MMLU file not found: {path}")
    by_topic: dict[str, list[dict]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise PocketError(f"{path}:{n} is not a JSON line") from None
            if row.get("correct_answer") not in LETTERS:  # the file's stray header rows
                continue
            by_topic[row.get("topic", "unknown")].append(row)
    if not by_topic:
        raise PocketError(f"{path} holds no MMLU questions")
    picked: list[dict] = []
    topics = sorted(by_topic)
    depth = 0
    while limit is None or len(picked) < limit:
        layer = [by_topic[t][depth] for t in topics if depth < len(by_topic[t])]
        if not layer:
            break
        picked.extend(layer)
        depth += 1
    return picked[:limit] if limit else picked


def prompt_for(q: dict) -> str:
    topic = q.get("topic", "").replace("_", " ")
    options = "\n".join(f"{L}. {q['answer_' + L.lower()]}" for L in LETTERS)
    return f"The following is a multiple choice question about {topic}.\n\n{q['question']}\n{options}\nAnswer:"


def letter_ids(runtime) -> list[int]:
    """The token each answer letter is written as after 'Answer:' (a leading space)."""
    return [runtime.tokenize(" " + L)[-1] for L in LETTERS]


def evaluate_mmlu(runtime, questions: list[dict], max_len: int, progress=None) -> dict:
    ids = letter_ids(runtime)
    correct = skipped = 0
    for q in questions:
        tokens = runtime.tokenize(prompt_for(q))
        if runtime.add_bos:
            tokens = [runtime.bos_id] + tokens
        if len(tokens) > max_len:
            skipped += 1
        else:
            last = runtime.logits(tokens)[-1]
            correct += LETTERS[int(np.argmax(last[ids]))] == q["correct_answer"]
        if progress:
            progress()
    scored = len(questions) - skipped
    return {"mmlu_acc": correct / scored if scored else None, "mmlu_n": scored, "mmlu_skipped": skipped}
