"""Extract-first answers: sentences, their scores, the span grammar (held to by llama.cpp itself),
and `ask` on the bundled Python FAQ with the default model: `make run`'s question answered from
and citing its FAQ entry, an absent subject refused."""
import pytest
from test_rag import MockModel

from pocketlm.rag.answer import NOTHING_FOUND, SPAN_WORDS, ask
from pocketlm.rag.embedder import Embedder
from pocketlm.rag.extract import (
    answer_start,
    best_span,
    checked_span,
    content_words,
    is_span,
    score_sentences,
    sentences,
    span_candidates,
    span_grammar,
)
from pocketlm.rag.index import index_paths
from pocketlm.rag.retrieve import Retriever
from pocketlm.rag.store import Store

BREAD = ("Baking bread\n============\n\nBread needs flour, water, salt and yeast. Knead it for ten minutes.\n\n"
         "Proofing\n--------\n\nLet the dough rise for two hours in a warm place until it doubles. "
         "A cold room, e.g. a cellar, slows it down.\n")


def test_sentences_keep_abbreviations_and_lead_ins_whole():
    text = "Dr. Smith came at 5 p.m. on Monday. He left, i.e. he went home.\n\nDo this::\n\n  chmod +x script\n\nThen run it!"
    assert sentences(text) == ["Dr. Smith came at 5 p.m. on Monday.", "He left, i.e. he went home.",
                               "Do this: chmod +x script", "Then run it!"]


def test_the_sentence_with_the_asked_facts_scores_first():
    emb = Embedder()
    ranked = score_sentences("How long should the dough rise?", [BREAD.split("Proofing")[0], BREAD], emb.encode)
    assert ranked[0].text.startswith("Let the dough rise for two hours") and ranked[0].hit == 1
    assert ranked[0].score > ranked[1].score


@pytest.mark.parametrize("answer,ok", [("two hours", True), ("rise for two hours in", True), ("doubles", True),
                                       ("doubles.", True), ("Let", True), ("two days", False), ("hours two", False),
                                       ("wo hours", False), ("", False), ("place until it doubles. Extra", False)])
def test_is_span_accepts_runs_of_whole_words_only(answer, ok):
    assert is_span(answer, "Let the dough rise for two hours in a warm place until it doubles.") is ok


def test_the_answers_kind_is_read_from_the_question():
    number, name = answer_start("How many people live there?"), answer_start("Who designed it?")
    assert number and number("1,200") and number("twelve") and number("$5") and not number("people")
    assert name and name("Gustave") and not name("engineer")
    assert answer_start("Why is the sky blue?") is None


def test_a_cut_last_word_is_dropped_and_anything_else_refused():
    quote = "Let the dough rise for two hours in a warm place until it doubles."
    assert checked_span("two hou", quote) == "two" and checked_span("two hours", quote) == "two hours"
    assert checked_span("three days", quote) == "" and checked_span("the answer is two", quote) == ""


class SpanModel(MockModel):
    """test_rag's stand-in for llama.cpp, replying in pieces that keep their spaces, recording its parameters."""

    def chat(self, messages, **kw):
        self.calls.append((messages, kw))
        yield from self.reply.split(" ")[:1] + [" " + w for w in self.reply.split(" ")[1:]]


@pytest.fixture(scope="module")
def bread_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    (folder / "bread.rst").write_text(BREAD)
    (folder / "volcano.md").write_text("# Volcanoes\n\nMolten rock that reaches the surface is called lava.\n")
    emb = Embedder()
    index_paths([folder], folder / "i.db", embedder=emb, progress=False)
    return Retriever(Store(folder / "i.db"), emb)


def test_extract_quotes_the_sentence_and_keeps_only_a_span_of_it(bread_index):
    model = SpanModel("two hours")
    a = ask("How long should bread dough rise?", bread_index, model, k=3)
    quote = "Let the dough rise for two hours in a warm place until it doubles."
    assert a.short == "two hours" and a.text == f'two hours [1]\n\nFrom [1]: "{quote}"'
    assert [c["n"] for c in a.citations] == [1] and a.citations[0]["source"].endswith("bread.rst")
    assert a.citations[0]["snippet"] == quote and a.citations[0]["heading"] == "Baking bread > Proofing"
    messages, params = model.calls[0]
    question = "How long should bread dough rise?"
    assert quote in messages[-1]["content"] and params["grammar"] == span_grammar(
        quote, avoid=content_words(question), max_words=SPAN_WORDS, starts=answer_start(question))
    invented = ask("How long should bread dough rise?", bread_index, SpanModel("three days at least"), k=3)
    assert invented.short == "" and invented.text == f'From [1]: "{quote}"'  # not in the source: not shown


def test_extract_refuses_without_asking_the_model(bread_index):
    silent = SpanModel("should not be called")
    a = ask("Who won the 1998 football world cup final?", bread_index, silent, k=3)
    assert a.text == NOTHING_FOUND and not a.grounded and not silent.calls


@pytest.mark.real_model
def test_llamacpp_generates_only_spans_under_the_grammar():
    from pocketlm.models.registry import DEFAULT_MODEL
    from pocketlm.models.source import resolve
    from pocketlm.runtime.llama_cpp_backend import LlamaCppModel

    model = LlamaCppModel(resolve(DEFAULT_MODEL).path, n_ctx=512)
    quote = 'The "Proofing" step: let it rise for 2 hours (or until doubled) at 25\\30 °C.'
    words = quote.split()
    for question in ("How long?", "Write a poem about the sea.", "What temperature?"):
        for max_tokens in (24, 3):  # also stopped mid-word: still the start of a run of the quote's words
            out = "".join(model.chat([{"role": "user", "content": f"{quote}\n{question}"}], max_tokens=max_tokens,
                                     temperature=0.0, seed=0, grammar=span_grammar(quote)))
            assert out and any(" ".join(words[i:]).startswith(out) for i in range(len(words))), out
            kept = checked_span(out, quote)
            assert kept and is_span(kept, quote) and out.startswith(kept), (out, kept)
    # the short answer's rules: none of the question's words, at most 3 words, starting at a number
    question = "How long does the proofing step let it rise?"
    grammar = span_grammar(quote, avoid=content_words(question), max_words=3, starts=answer_start(question))
    for prompt in ("How long?", "Say something about proofing."):
        out = "".join(model.chat([{"role": "user", "content": f"{quote}\n{prompt}"}], max_tokens=24, temperature=0.0,
                                 seed=0, grammar=grammar))
        assert is_span(out, quote) and len(out.split()) <= 3 and any(c.isdigit() for c in out.split()[0]), out
        assert not content_words(out) & content_words(question), out


@pytest.mark.real_model
def test_make_runs_question_is_answered_from_its_faq_entry(tmp_path):
    from importlib.resources import files

    from pocketlm.models.registry import DEFAULT_MODEL
    from pocketlm.models.source import resolve
    from pocketlm.runtime.llama_cpp_backend import LlamaCppModel

    emb = Embedder()
    index_paths([str(files("pocketlm") / "data" / "python-faq")], tmp_path / "faq.db", embedder=emb, progress=False)
    retriever = Retriever(Store(tmp_path / "faq.db"), emb)
    model = LlamaCppModel(resolve(DEFAULT_MODEL).path, n_ctx=2048)
    a = ask("How do I make a Python script executable on Unix?", retriever, model, max_tokens=120)
    cite = a.citations[0]
    assert cite["source"].endswith("library.rst") and "executable on Unix" in cite["heading"], cite
    assert "executable" in cite["snippet"] and "#!" in cite["snippet"], cite["snippet"]
    assert a.short and is_span(a.short, cite["snippet"]) and a.text.startswith(a.short)
    absent = ask("Who painted the Mona Lisa?", retriever, model, max_tokens=32)
    assert absent.text == NOTHING_FOUND and absent.citations == []


def test_span_candidates_are_the_runs_the_rule_admits():
    """Against a brute force over every (first, last) word pair: the same question-word, length and
    first-word rules span_grammar is built from."""
    quote = "In 1889, the engineer Gustave Eiffel built the tower (for the World's Fair) in Paris."
    question = "Who built the tower in Paris?"
    avoid, starts = content_words(question), answer_start(question)
    words = quote.split()
    free = [not (content_words(w) & avoid) for w in words]
    want = []
    for i in range(len(words)):
        if not (free[i] and starts(words[i])):
            continue
        for j in range(i, min(i + 4, len(words))):
            if all(free[i:j + 1]):
                last = words[j].rstrip(".,;:!?\"')]") or words[j]
                want += [(i, " ".join(words[i:j] + [w])) for w in dict.fromkeys((last, words[j]))]
    got = span_candidates(quote, avoid, 4, starts)
    assert sorted(got) == sorted(want) and ("Gustave Eiffel" in [t for _, t in got])
    assert all(is_span(t, quote) for _, t in got)
    assert "(for" not in [t for _, t in got]  # "(for" does not start with a capital: not a name


def test_best_span_scores_each_span_inside_its_run():
    """Prefix sharing gives each candidate its own tokens' log-probs and its own end: the same
    totals as scoring it alone, with the likeliest returned."""
    vocab: dict[str, int] = {}

    def tokenize(text):
        return [vocab.setdefault(w, len(vocab)) for w in text.replace(",", " ,").split()]

    import numpy as np

    def score_runs(runs):  # token t costs -t/10; ending after n tokens costs -1/(n+1)
        return [(-np.array(r, float) / 10, -1 / (np.arange(len(r) + 1) + 1)) for r in runs]

    def alone(text):
        tokens, ends = score_runs([tokenize(text)])[0]
        return float(tokens.sum() + ends[-1])

    cands = [(0, "alpha"), (0, "alpha beta"), (0, "alpha beta,"), (2, "gamma"), (2, "gamma delta"), (3, "delta")]
    text, total = best_span(cands, tokenize, score_runs)
    totals = {t: alone(t) for _, t in cands}
    assert text == max(totals, key=totals.get) == "alpha beta" and total == pytest.approx(totals[text])
    assert best_span(cands[3:], tokenize, score_runs) == ("gamma", pytest.approx(totals["gamma"]))


@pytest.mark.real_model
def test_scored_span_is_the_likeliest_whole_answer():
    """The span `ask` picks by likelihood, against each candidate scored on its own by llama.cpp's
    logits for the whole sequence (prompt, answer, end of turn)."""
    import numpy as np

    from pocketlm.models.registry import DEFAULT_MODEL
    from pocketlm.models.source import resolve
    from pocketlm.runtime.llama_cpp_backend import LlamaCppModel

    path = resolve(DEFAULT_MODEL).path
    model = LlamaCppModel(path, n_ctx=512)
    quote = "The tower was built in 1889 by the company of the engineer Gustave Eiffel for the World's Fair."
    question = "Who built the tower?"
    messages = [{"role": "user", "content": f'Source: "{quote}"\nQuestion: {question}'}]
    cands = span_candidates(quote, content_words(question), 3, answer_start(question))
    text, total = best_span(cands, model.tokenize, model.continuation_scorer(messages))
    whole = LlamaCppModel(path, n_ctx=512, logits_all=True)
    prefix, _ = whole.chat_prompt(messages)
    end = whole.llm.token_eos()
    alone = {}
    for _, t in cands:
        ids = whole.tokenize(t)
        logits = whole.logits(prefix + ids)
        lp = logits - np.logaddexp.reduce(logits.astype(np.float64), axis=1, keepdims=True)
        alone[t] = float(sum(lp[len(prefix) - 1 + k, tok] for k, tok in enumerate(ids)) + lp[-1, end])
    assert total == pytest.approx(alone[text], abs=0.05)
    assert max(alone.values()) - alone[text] < 0.05  # the likeliest, up to batch rounding
    assert text in {t for _, t in cands} and len(cands) > 5
