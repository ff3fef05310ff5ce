"""ModelFacts: the one place that knows a model's shape and how its tensors are named.

quantize, plan/sensitivity, export and the streaming layer source ask this object instead of
re-reading config.json or GGUF keys; the per-architecture layout rules (which architectures
permute Q/K rows, which store norms as 1 + w) come from hf_arch.ARCHS through it.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PocketError
from .hf_arch import ARCHS, SUPPORTED_GGUF_ARCHS, ArchSpec, arch_for


def hf_config(folder: Path):
    """transformers' config of a HF folder; a config.json that is not a readable JSON object
    becomes one error line instead of a traceback."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PocketError(f"{path} is not a usable model config ({type(exc).__name__}: {exc})") from None
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:  # transformers parses the values and raises many types on bad ones (a dtype
        # 'flt32' is an AttributeError): every one means the same to the user
        raise PocketError(f"{path} is not a usable model config ({type(exc).__name__}: {exc})") from None


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_layers: int):
    # gguf-py builds this map from scratch on every call (~15 ms, every name of every architecture);
    # asked once per tensor it cost seconds per model load
    import gguf

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    return gguf.get_tensor_name_map(arch_enum, n_layers)


@dataclass(frozen=True)
class ModelFacts:
    model_type: str  # Hugging Face model_type ("llama", "gemma3_text", ...)
    arch: str  # llama.cpp's architecture name
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # the output projection is the token embedding
    context: int | None = None

    @property
    def spec(self) -> ArchSpec:
        return arch_for(self.model_type)

    @property
    def gqa(self) -> int:
        return max(self.n_heads // max(self.n_kv_heads, 1), 1)

    def name_map(self):
        """gguf-py's HF -> GGUF tensor name map for this architecture and depth."""
        return _name_map(self.arch, self.n_layers)

    def gguf_name(self, hf_name: str) -> str | None:
        name = hf_name.removeprefix("model.language_model.").removeprefix("language_model.")
        return self.name_map().get_name(name, try_suffixes=(".weight", ".bias"))

    def stored_offset(self, hf_name: str) -> float:
        """What GGUF adds to a tensor's HF value: 1 for Gemma's norms (HF keeps w for x * (1 + w),
        llama.cpp multiplies by the stored 1 + w), else 0."""
        return 1.0 if self.spec.norm_plus_one and hf_name.endswith("norm.weight") else 0.0

    def permuted_heads(self, gguf_name: str) -> int | None:
        """How many heads a tensor's rows are interleaved by (llama.cpp's rotary layout), or None."""
        if not self.spec.permute_qk:
            return None
        if gguf_name.endswith("attn_q.weight"):
            return self.n_heads
        if gguf_name.endswith("attn_k.weight"):
            return self.n_kv_heads
        return None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The (rows, cols) every model of these facts must have, by GGUF name; checked against
        the checkpoint before any work so a config/weights mismatch fails in seconds."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.vocab, self.hidden)}
        for i in range(self.n_layers):
            b = f"blk.{i}."
            shapes.update({b + "attn_q.weight": (q, self.hidden), b + "attn_k.weight": (kv, self.hidden),
                           b + "attn_v.weight": (kv, self.hidden), b + "attn_output.weight": (self.hidden, q),
                           b + "ffn_gate.weight": (self.ffn, self.hidden), b + "ffn_up.weight": (self.ffn, self.hidden),
                           b + "ffn_down.weight": (self.hidden, self.ffn)})
        if not self.tied:
            shapes["output.weight"] = (self.vocab, self.hidden)
        return shapes

    @classmethod
    def from_hf_config(cls, cfg, where: str = "config.json") -> "ModelFacts":
        """From a transformers config object (class defaults apply, as transformers loads it)."""
        text = getattr(cfg, "text_config", None) or cfg
        model_type = getattr(text, "model_type", None)
        if model_type not in ARCHS:
            raise PocketError(f"unsupported architecture {model_type!r} in {where} (supported: {', '.join(sorted(ARCHS))})")
        try:
            heads = int(text.num_attention_heads)
            hidden = int(text.hidden_size)
            return cls(model_type=model_type, arch=ARCHS[model_type].gguf_arch,
                       n_layers=int(text.num_hidden_layers), hidden=hidden, ffn=int(text.intermediate_size),
                       n_heads=heads, n_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                       head_dim=int(getattr(text, "head_dim", None) or hidden // heads), vocab=int(text.vocab_size),
                       tied=bool(getattr(text, "tie_word_embeddings", False)),
                       context=getattr(text, "max_position_embeddings", None))
        except (AttributeError, TypeError, ValueError) as exc:
            raise PocketError(f"{where} lacks or garbles a model dimension ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_hf_folder(cls, folder: Path) -> "ModelFacts":
        return cls.from_hf_config(hf_config(folder), str(Path(folder) / "config.json"))

    @classmethod
    def from_gguf(cls, reader, where: str = "GGUF") -> "ModelFacts":
        from .gguf_file import field_value

        arch = field_value(reader, "general.architecture", "unknown")
        if arch not in SUPPORTED_GGUF_ARCHS:
            raise PocketError(f"unsupported architecture {arch!r} in {where} (supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHS))})")
        model_type = next(t for t, s in ARCHS.items() if s.gguf_arch == arch)
        shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
        heads = int(field_value(reader, f"{arch}.attention.head_count", 1))
        hidden = int(field_value(reader, f"{arch}.embedding_length", 0))
        tokens = field_value(reader, "tokenizer.ggml.tokens", None)
        vocab = shapes.get("token_embd.weight", (len(tokens or ()), 0))[0]
        return cls(model_type=model_type, arch=arch, n_layers=int(field_value(reader, f"{arch}.block_count", 0)),
                   hidden=hidden, ffn=int(field_value(reader, f"{arch}.feed_forward_length", 0)), n_heads=heads,
                   n_kv_heads=int(field_value(reader, f"{arch}.attention.head_count_kv", heads)),
                   head_dim=int(field_value(reader, f"{arch}.attention.key_length", hidden // max(heads, 1))),
                   vocab=int(vocab), tied="output.weight" not in shapes,
                   context=field_value(reader, f"{arch}.context_length", None))
