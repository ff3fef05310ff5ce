"""Continuous batching (runtime/batched.py): alone, a sequence is decoded exactly as
llama-cpp-python decodes it; together, every sequence's greedy tokens are the argmax of a
full evaluation of its own text (no sequence sees another's cache), and the server answers
through it."""
from __future__ import annotations

import json
import threading

import numpy as np
import openai
import pytest
from test_serve import LiveServer

from pocketlm.models.export_gguf import cached_gguf
from pocketlm.models.registry import DEFAULT_MODEL
from pocketlm.runtime.batched import BatchedEngine, BatchedSlot
from pocketlm.runtime.llama_cpp_backend import LlamaCppModel
from pocketlm.serve.app import create_app
from pocketlm.serve.engine import make_pool

pytestmark = pytest.mark.real_model
QUESTIONS = ["Name three colours.", "What is the capital of France?", "Write a haiku about rain.",
             "Count from one to five."]


@pytest.fixture(scope="module")
def engine():
    eng = BatchedEngine(cached_gguf(DEFAULT_MODEL, "f16"), n_ctx=512, n_seq=4, n_threads=2)
    yield eng
    eng.close()


def _chat(slot, q: str, n: int = 16) -> tuple[str, str]:
    text, finish = "", None
    for chunk in slot.stream_chat([{"role": "user", "content": q}], max_tokens=n, temperature=0):
        choice = chunk["choices"][0]
        text += choice["delta"].get("content", "")
        finish = choice["finish_reason"] or finish
    return text, finish


def test_alone_it_decodes_as_llama_cpp_python_does(engine):
    ref = LlamaCppModel(cached_gguf(DEFAULT_MODEL, "f16"), n_ctx=512)
    for q in QUESTIONS[:2]:
        want = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in ref.stream_chat([{"role": "user", "content": q}], max_tokens=16, temperature=0))
        assert _chat(BatchedSlot(engine), q)[0] == want


def test_together_each_sequence_is_its_own(engine):
    """A batch's rows round a little differently from a lone token's, so a near-tie may go the other way;
    but each token must be the argmax of its own text's logits up to that rounding (a sequence reading
    another's cache would be off by whole logits)."""
    out: dict = {}
    threads = [threading.Thread(target=lambda q=q: out.__setitem__(q, _chat(BatchedSlot(engine), q, 24))) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ref = LlamaCppModel(cached_gguf(DEFAULT_MODEL, "f16"), n_ctx=512, logits_all=True)
    for q in QUESTIONS:
        text, finish = out[q]
        assert text and finish in ("stop", "length"), (q, out[q])
        prompt = engine.base.chat_prompt([{"role": "user", "content": q}])[0]
        made = ref.tokenize(text, special=True)
        logits = ref.logits(prompt + made)[len(prompt) - 1:-1]
        gaps = logits.max(axis=1) - logits[np.arange(len(made)), made]
        assert gaps.max() < 0.25, (q, text, gaps)


def test_stops_lengths_and_abandoned_sequences(engine):
    slot = BatchedSlot(engine)
    chunks = list(slot.stream_completion("1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"]))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.strip().startswith("5") and "7" not in text and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert _chat(slot, "Tell me a long story.", 5)[1] == "length"
    for _ in range(engine.n_seq + 2):  # more abandoned streams than slots: each frees its slot
        stream = slot.stream_chat([{"role": "user", "content": "Tell me a long story."}], max_tokens=50, temperature=0)
        next(stream)
        stream.close()
    assert _chat(slot, QUESTIONS[1])[0]


def test_serve_with_the_batched_engine():
    pool = make_pool(DEFAULT_MODEL, engine="batched", ctx=512, parallel=4, max_queue=4, say=lambda _: None)
    server = LiveServer(create_app(pool, DEFAULT_MODEL, None, api_key=None, max_upload_mb=1))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        replies: dict = {}

        def ask(q):
            replies[q] = client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                                        max_tokens=16, temperature=0)
        threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(replies[q].choices[0].message.content and replies[q].usage.completion_tokens > 0 for q in QUESTIONS)
        js = client.chat.completions.create(model="m", temperature=0, max_tokens=120, response_format={"type": "json_object"},
                                            messages=[{"role": "user", "content": "Give a JSON object with a name and an age."}])
        assert isinstance(json.loads(js.choices[0].message.content), dict)  # the grammar holds in the batch too
    finally:
        server.stop()
