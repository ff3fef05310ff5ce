"""What a model file holds, read from headers only (no weights are loaded)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PocketError
from .source import ModelSource, resolve

# Tensors that map tokens in and out; their count is reported apart from the transformer body
# because it barely changes with depth/width and dominates small models.
_EMBEDDING_NAMES = {"token_embd.weight", "output.weight", "lm_head.weight"}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (rows, cols)
    type: str
    n_bytes: int

    @property
    def n_params(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_embedding(self) -> bool:
        return self.name in _EMBEDDING_NAMES or self.name.endswith("embed_tokens.weight")


@dataclass
class ModelInfo:
    source: str
    path: Path
    format: str  # "gguf" or "hf"
    architecture: str
    context_length: int | None
    vocab_size: int | None
    chat_template: bool
    file_size: int
    tensors: list[TensorInfo] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(t.n_params for t in self.tensors)

    @property
    def n_embedding_params(self) -> int:
        return sum(t.n_params for t in self.tensors if t.is_embedding)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        """Bits per weight over all tensors, as llama.cpp counts it (metadata excluded)."""
        return 8.0 * self.tensor_bytes / max(self.n_params, 1)

    def type_summary(self) -> list[tuple[str, int, int]]:
        """(type, tensor count, parameter count), most parameters first."""
        count: Counter[str] = Counter()
        params: Counter[str] = Counter()
        for t in self.tensors:
            count[t.type] += 1
            params[t.type] += t.n_params
        return sorted(((k, count[k], params[k]) for k in count), key=lambda r: -r[2])

    def to_dict(self) -> dict:
        return {
            "model": self.source,
            "path": str(self.path),
            "format": self.format,
            "architecture": self.architecture,
            "n_params": self.n_params,
            "n_embedding_params": self.n_embedding_params,
            "n_non_embedding_params": self.n_params - self.n_embedding_params,
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "chat_template": self.chat_template,
            "file_size": self.file_size,
            "bpw": round(self.bpw, 4),
            "types": [{"type": t, "tensors": c, "params": p} for t, c, p in self.type_summary()],
            **self.extra,
        }


def inspect(source) -> ModelInfo:
    src = resolve(source)
    return _inspect_gguf(src) if src.is_gguf else _inspect_hf(src)


def _inspect_gguf(src: ModelSource) -> ModelInfo:
    from .gguf_file import field_value, open_gguf

    reader = open_gguf(src.path)
    arch = field_value(reader, "general.architecture", "unknown")
    tensors = [
        TensorInfo(t.name, tuple(int(x) for x in reversed(t.shape)), t.tensor_type.name, int(t.n_bytes))
        for t in reader.tensors
    ]
    tokens = field_value(reader, "tokenizer.ggml.tokens", None)
    return ModelInfo(
        source=src.name,
        path=src.path,
        format="gguf",
        architecture=arch,
        context_length=field_value(reader, f"{arch}.context_length", None),
        vocab_size=len(tokens) if tokens is not None else None,
        chat_template=field_value(reader, "tokenizer.chat_template", None) is not None,
        file_size=src.path.stat().st_size,
        tensors=tensors,
        extra={"name": field_value(reader, "general.name", None)},
    )


def _inspect_hf(src: ModelSource) -> ModelInfo:
    from .tensors import SafetensorsSource

    ts = SafetensorsSource(src)
    ts.check_shapes()  # a bad config, an unknown architecture, damaged shards: one error line
    config = json.loads((src.path / "config.json").read_text())
    tensors: list[TensorInfo] = []
    size = 0
    for st in ts.files:
        size += st.path.stat().st_size
        for name in st.keys():
            begin, end = st.meta[name]["data_offsets"]
            tensors.append(TensorInfo(name, st.shape(name), st.dtype(name), end - begin))
    if not tensors:
        raise PocketError(f"{src.path} holds no safetensors weights")
    template = False
    tc = src.path / "tokenizer_config.json"
    if tc.exists():
        template = "chat_template" in json.loads(tc.read_text())
    template = template or (src.path / "chat_template.jinja").exists()
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    text_cfg = config.get("text_config", config)
    return ModelInfo(
        source=src.name,
        path=src.path,
        format="hf",
        architecture=archs[0],
        context_length=text_cfg.get("max_position_embeddings"),
        vocab_size=text_cfg.get("vocab_size"),
        chat_template=template,
        file_size=size,
        tensors=tensors,
        extra={"model_type": config.get("model_type")},
    )
