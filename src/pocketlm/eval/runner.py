"""`pocketlm eval`: one pass over the text for MODEL, one cached pass for REFERENCE.

GGUF files are evaluated by llama.cpp (the runtime users run); HF folders by torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from ..errors import PocketError
from ..models.info import inspect
from ..models.source import ModelSource, resolve
from . import metrics
from .mmlu import evaluate_mmlu, load_questions
from .reference import ReferenceLogits, ReferenceWriter, load_cached, reference_key
from .windows import Windows, make_windows, read_texts

PROBE_CHARS = 4000  # text tokenized by both models to prove they share a vocabulary


@dataclass
class EvalOptions:
    texts: list = field(default_factory=list)
    reference: str | None = None
    max_tokens: int | None = None
    ctx: int = 512
    mmlu: str | None = None
    mmlu_limit: int | None = None
    speed: bool = False
    torch_dtype: str = "float32"
    threads: int = 2
    progress: bool = True
    backend: str = "auto"  # "torch" evaluates GGUF files through transformers too (e.g. on a GPU with no llama.cpp)


def open_runtime(src: ModelSource, ctx: int, opts: EvalOptions):
    if src.is_gguf and opts.backend != "torch":
        from ..runtime.llama_cpp_backend import LlamaCppModel

        return LlamaCppModel(src.path, n_ctx=max(ctx, 1024), n_threads=opts.threads, logits_all=True), "llama.cpp"
    import torch

    from ..models.load import load
    from ..runtime.torch_backend import TorchModel

    torch.set_num_threads(opts.threads)
    return TorchModel(load(src), dtype=opts.torch_dtype), f"torch {opts.torch_dtype}"


def _windows_for(runtime, text: str, opts: EvalOptions) -> Windows:
    tokens = runtime.tokenize(text)
    return make_windows(tokens, opts.ctx, runtime.bos_id if runtime.add_bos else None, opts.max_tokens)


def _window_logp(runtime, windows: Windows, i: int) -> np.ndarray:
    """Log-probs at the scored positions of window i."""
    return metrics.log_softmax(runtime.logits(windows.inputs[i].tolist())[:-1])


def _compute_reference(runtime, windows: Windows, key: str, about: dict, progress: bool) -> ReferenceLogits:
    n, width = windows.targets.shape
    writer = ReferenceWriter(key, n, width, runtime.n_vocab, about)
    try:
        for i in tqdm(range(n), desc="reference", unit="window", disable=not progress):
            logp = _window_logp(runtime, windows, i)
            writer.add(i, logp, metrics.nll(logp, windows.targets[i]))
    except BaseException as exc:  # Ctrl-C included: no half-written cache entry survives
        writer.abort(exc)
        raise
    return writer.finish()


def _reference(ref_src: ModelSource, cand_runtime, text: str, windows: Windows, opts: EvalOptions) -> tuple[ReferenceLogits, str]:
    ref_runtime, backend = open_runtime(ref_src, opts.ctx, opts)
    if ref_runtime.n_vocab != cand_runtime.n_vocab or \
            ref_runtime.tokenize(text[:PROBE_CHARS]) != cand_runtime.tokenize(text[:PROBE_CHARS]):
        raise PocketError(f"the reference {ref_src.name} uses another vocabulary than the model; KLD needs the same tokenizer")
    key = reference_key(ref_src, windows.inputs, backend)
    cached = load_cached(key)
    if cached is not None:
        return cached, backend
    about = {"reference": str(ref_src.path), "backend": backend, "ctx": opts.ctx, "windows": int(windows.inputs.shape[0])}
    return _compute_reference(ref_runtime, windows, key, about, opts.progress), backend


def evaluate(model: str, opts: EvalOptions) -> dict:
    src = resolve(model)
    info = inspect(src)
    ref_src = resolve(opts.reference) if opts.reference else None
    if not opts.texts and not opts.mmlu and not opts.speed:
        raise PocketError("nothing to measure: give --text FILE, --mmlu FILE or --speed")
    text = read_texts(opts.texts) if opts.texts else None
    runtime, backend = open_runtime(src, opts.ctx, opts)
    result: dict = {"model": src.name, "size_bytes": info.file_size, "bpw": round(info.bpw, 4),
                    "backend": backend, "ctx": opts.ctx}
    if text is not None:
        windows = _windows_for(runtime, text, opts)
        ref = ref_backend = None
        if ref_src is not None:
            ref, ref_backend = _reference(ref_src, runtime, text, windows, opts)
        nll, kld, top1 = [], [], []
        for i in tqdm(range(windows.inputs.shape[0]), desc="model", unit="window", disable=not opts.progress):
            logp = _window_logp(runtime, windows, i)
            nll.append(metrics.nll(logp, windows.targets[i]))
            if ref is not None:
                kld.append(metrics.kld(ref.logp(i), logp))
                top1.append(logp.argmax(-1) == ref.argmax[i])
        cat = lambda xs: np.concatenate(xs) if xs else None  # noqa: E731
        result.update(metrics.summarize(np.concatenate(nll), cat(kld), cat(top1)))
        result["bos"] = windows.bos
        if ref is not None and ref_src is not None:
            result.update(reference=ref_src.name, reference_backend=ref_backend,
                          reference_ppl=float(np.exp(ref.nll.mean())))
    if opts.mmlu:
        questions = load_questions(opts.mmlu, opts.mmlu_limit)
        with tqdm(total=len(questions), desc="mmlu", unit="q", disable=not opts.progress) as bar:
            result.update(evaluate_mmlu(runtime, questions, max_len=max(opts.ctx, 1024), progress=bar.update))
    if opts.speed:
        from .speed import measure

        del runtime  # free the evaluation copy before the speed child loads its own
        speed = measure(str(src.path), threads=opts.threads, torch_dtype=opts.torch_dtype)
        result.update(prefill_tps=speed["prefill_tps"], decode_tps=speed["decode_tps"],
                      peak_rss_mb=speed["peak_rss_mb"], speed_backend=speed["backend"])
    for key in ("tokens", "ppl", "kld_mean", "kld_p99", "top1", "mmlu_acc", "prefill_tps", "decode_tps", "peak_rss_mb"):
        result.setdefault(key, None)
    return result
