"""Student shapes: what to keep of the teacher, the default choice, and what it will weigh.

The default keeps every Linear input a multiple of 256 (hidden size, attention width, MLP
width), because llama.cpp's k-quants (Q2_K..Q6_K) only apply to such rows: an unaligned
student would fall back to the coarser legacy types exactly where it matters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import PocketError

ALIGN = 256
SIZE_PRESETS = ("Q8_0", "Q4_K_M", "Q2_K")


@dataclass(frozen=True)
class TeacherDims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config) -> "TeacherDims":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.intermediate_size, config.vocab_size,
                   bool(getattr(config, "tie_word_embeddings", False)))

    def non_embedding(self) -> int:
        return non_embedding_params(self, self.layers, self.hidden, self.heads, self.kv_heads, self.ffn)


@dataclass(frozen=True)
class StudentShape:
    keep_layers: tuple[int, ...]  # teacher layer indices, in order
    hidden: int
    heads: int
    kv_heads: int
    ffn: int

    def to_dict(self) -> dict:
        return {**asdict(self), "keep_layers": list(self.keep_layers)}

    @classmethod
    def from_dict(cls, d: dict) -> "StudentShape":
        return cls(**{**d, "keep_layers": tuple(d["keep_layers"])})

    def non_embedding(self, t: TeacherDims) -> int:
        return non_embedding_params(t, len(self.keep_layers), self.hidden, self.heads, self.kv_heads, self.ffn)


def _align_down(n: int, step: int = ALIGN) -> int:
    return max(step, n // step * step) if n >= step else n


def non_embedding_params(t: TeacherDims, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int) -> int:
    attn = hidden * t.head_dim * (2 * heads + 2 * kv_heads)
    return layers * (attn + 3 * hidden * ffn + 2 * hidden) + hidden


def validate(t: TeacherDims, shape: StudentShape) -> None:
    """One clear sentence for every shape the teacher cannot be pruned to."""
    if not shape.keep_layers or len(set(shape.keep_layers)) != len(shape.keep_layers):
        raise PocketError("the student needs at least one layer, each kept once")
    if min(shape.keep_layers) < 0 or max(shape.keep_layers) >= t.layers:
        raise PocketError(f"layer indices must be in 0..{t.layers - 1} (the teacher has {t.layers} layers)")
    for what, new, old in (("--hidden", shape.hidden, t.hidden), ("--heads", shape.heads, t.heads),
                           ("--ffn", shape.ffn, t.ffn)):
        if not 0 < new <= old:
            raise PocketError(f"{what} {new} must be between 1 and the teacher's {old}")
    group = t.heads // t.kv_heads
    if shape.kv_heads == shape.heads:
        return  # every kept head gets its own copy of its group's key/value rows
    if shape.kv_heads > t.kv_heads or shape.heads % shape.kv_heads or shape.heads // shape.kv_heads > group:
        raise PocketError(
            f"--heads {shape.heads} --kv-heads {shape.kv_heads} cannot be cut from the teacher's {t.heads} heads in "
            f"{t.kv_heads} key/value groups of {group}: keep whole groups (kv-heads <= {t.kv_heads}, heads a multiple "
            f"of kv-heads, at most {group} per group) or set --kv-heads equal to --heads")


def default_kv_heads(t: TeacherDims, heads: int) -> int:
    group = t.heads // t.kv_heads
    for kv in range(min(t.kv_heads, heads), 0, -1):
        if heads % kv == 0 and heads // kv <= group:
            return kv
    return heads


def default_shape(t: TeacherDims, layer_order: list[int], fraction: float = 0.5, *, layers: int | None = None,
                  hidden: int | None = None, ffn: int | None = None, heads: int | None = None,
                  kv_heads: int | None = None) -> StudentShape:
    """Widths aligned down to 256 (attention width = heads * head_dim too), then as many of the
    most important layers as fit in `fraction` of the teacher's non-embedding parameters.
    `layer_order` lists teacher layers from most to least important."""
    hidden = hidden or _align_down(t.hidden)
    if heads is None:
        heads = max(1, min(t.heads, hidden // t.head_dim))
        while heads > 1 and (heads * t.head_dim) % ALIGN:
            heads -= 1
    kv_heads = kv_heads or default_kv_heads(t, heads)
    ffn = ffn or _align_down(min(t.ffn, int(t.ffn * min(1.0, fraction * 1.34))))
    if layers is None:
        budget = fraction * t.non_embedding()
        layers = 1
        while layers < t.layers and non_embedding_params(t, layers + 1, hidden, heads, kv_heads, ffn) <= budget:
            layers += 1
    if not 0 < layers <= t.layers:
        raise PocketError(f"--layers {layers} must be between 1 and the teacher's {t.layers}")
    keep = tuple(sorted(layer_order[:layers]))
    return StudentShape(keep, hidden, heads, kv_heads, ffn)


def gguf_shapes(t: TeacherDims, s: StudentShape) -> list[tuple[str, tuple[int, ...]]]:
    """The student's tensors as a GGUF export names them, (rows, cols) like the quantizer sees."""
    hd = t.head_dim
    out = [("token_embd.weight", (t.vocab, s.hidden)), ("output_norm.weight", (s.hidden,))]
    if not t.tied:
        out.append(("output.weight", (t.vocab, s.hidden)))
    for i in range(len(s.keep_layers)):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (s.hidden,)), (p + "ffn_norm.weight", (s.hidden,)),
                (p + "attn_q.weight", (s.heads * hd, s.hidden)), (p + "attn_k.weight", (s.kv_heads * hd, s.hidden)),
                (p + "attn_v.weight", (s.kv_heads * hd, s.hidden)), (p + "attn_output.weight", (s.hidden, s.heads * hd)),
                (p + "ffn_gate.weight", (s.ffn, s.hidden)), (p + "ffn_up.weight", (s.ffn, s.hidden)),
                (p + "ffn_down.weight", (s.hidden, s.ffn))]
    return out


def predicted_sizes(t: TeacherDims, s: StudentShape, presets=SIZE_PRESETS) -> dict[str, int]:
    """Bytes of tensor data per preset, from the same per-tensor plan `pocketlm quantize` uses."""
    from ..quantize.plan import preset_bytes, tensor_bytes

    shapes = gguf_shapes(t, s)
    sizes = {"F16": sum(tensor_bytes("F16", shape) for _, shape in shapes)}
    for preset in presets:
        sizes[preset] = preset_bytes(shapes, preset, len(s.keep_layers), max(s.heads // s.kv_heads, 1))
    return sizes
