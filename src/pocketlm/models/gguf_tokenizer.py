"""Tokenizer metadata for GGUF files written from Hugging Face folders.

Two sources, best first:
1. A sidecar `gguf_tokenizer.json` that pocketlm writes into every HF folder it makes from a
   GGUF: the original `tokenizer.*` keys, so GGUF -> HF -> GGUF keeps the tokenizer exact.
2. `tokenizer.json`, through gguf-py's vocab readers. llama.cpp also needs the name of the
   pre-tokenizer regex; upstream's converter finds it by hashing sample output, we match the
   pre-tokenizer's JSON shape against the few families we know and say so when we do not.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import PocketError

SIDECAR = "gguf_tokenizer.json"
log = logging.getLogger(__name__)


def sidecar_from_reader(reader) -> dict:
    """Serializable copy of a GGUF's tokenizer keys: {key: [value, type name, subtype name]}."""
    import gguf

    out = {}
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        sub = f.types[-1].name if f.types[0] == gguf.GGUFValueType.ARRAY else None
        out[key] = [f.contents(), f.types[0].name, sub]
    return out


def add_sidecar_to_writer(writer, sidecar: dict) -> None:
    import gguf

    for key, (value, vtype, sub) in sidecar.items():
        writer.add_key_value(key, value, gguf.GGUFValueType[vtype], gguf.GGUFValueType[sub] if sub else None)


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    pre = json.dumps(tokenizer_json.get("pre_tokenizer"), sort_keys=True)
    if '"Digits"' in pre and '"individual_digits": true' in pre and '"ByteLevel"' in pre:
        return "smollm"  # digits split one by one, then GPT-2's byte-level regex (SmolLM, StarCoder)
    if r"\\p{N}{1,3}" in pre:
        return "llama-bpe"  # Llama 3's regex: numbers in groups of up to three
    if r"[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|" in pre:
        return "qwen2"
    if '"ByteLevel"' in pre and '"use_regex": true' in pre:
        return "gpt-2"
    log.warning("unknown pre-tokenizer; writing 'default' (llama.cpp may split text differently)")
    return "default"


def match_llamacpp_pre_tokenizer(tokenizer, sidecar: dict | None) -> None:
    """transformers' GGUF tokenizer converter knows the split of many `tokenizer.ggml.pre` names
    but not "smollm", which gets GPT-2's plain byte-level split. SmolLM2's own tokenizer.json
    and llama.cpp split each digit off first; without that, whitespace before a digit splits
    differently ("x  2" -> "x", " ", " ", "2" instead of "x", "  ", "2": 140 of 376 Python-docs
    pages), so calibration, evaluation and distillation in torch saw other token ids than
    llama.cpp gives the same text at run time."""
    pre = (sidecar or {}).get("tokenizer.ggml.pre", [None])[0]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if pre != "smollm" or backend is None:
        return
    from tokenizers import pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def add_hf_tokenizer_to_writer(writer, folder: Path, n_vocab: int) -> None:
    sidecar = folder / SIDECAR
    if sidecar.exists():
        add_sidecar_to_writer(writer, json.loads(sidecar.read_text()))
        return
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    tj_path = folder / "tokenizer.json"
    if not tj_path.exists():
        raise PocketError(f"{folder} has no tokenizer.json: cannot write the tokenizer into the GGUF")
    tj = json.loads(tj_path.read_text())
    model_type = tj.get("model", {}).get("type")
    vocab: BpeVocab | LlamaHfVocab
    if model_type == "BPE" and not tj["model"].get("byte_fallback") and (tj.get("decoder") or {}).get("type") == "ByteLevel":
        vocab = BpeVocab(folder)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(tj))
        load_merges = True
    elif model_type in ("BPE", "Unigram"):
        vocab = LlamaHfVocab(folder)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        load_merges = False
    else:
        raise PocketError(f"unsupported tokenizer type {model_type!r} in {tj_path}")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    # Tokens flagged special in tokenizer.json must be CONTROL, or llama.cpp will not parse
    # them in chat prompts (gguf-py marks added tokens that repeat base-vocab ones NORMAL).
    special_ids = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special_ids else t for i, t in enumerate(types)]
    while len(tokens) < n_vocab:  # embedding rows padded beyond the tokenizer
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=load_merges, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
