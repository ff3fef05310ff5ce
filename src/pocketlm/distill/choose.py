"""Which student, at how many bits, for a budget below the smallest file of the teacher.

A budget can be met by many (shape, bits) pairs: a large student at ~3.5 bits per weight or a
small one at ~5.5. Neither pruning damage nor quantization damage alone decides, so the choice
is made in two stages:

1. From shapes alone (instant): every candidate shape (hidden width aligned to 256 so the
   k-quants apply, or the teacher's own; MLP width; attention heads; the most influential
   layers kept) gets its smallest file and the bits per weight the budget leaves it. From the
   shapes that fit, the finalists are the largest shape affording each of a few bit levels
   (they span "more parameters, fewer bits" to "fewer parameters, more bits"), and the largest
   that keeps the teacher's residual width and heads, which counting parameters alone passes
   over: cutting the residual stream costs more than its share of parameters (a Python-docs
   student kept at the teacher's width healed to 1.09x its perplexity where every narrower
   one stayed at 1.34x: bench/results/distill.md).
2. Pilot heals (minutes): each finalist is pruned and healed for a short run (Minitron, arXiv
   2407.14679: rankings between shapes settle within a few hundred steps of healing), its
   held-out KLD to the teacher measured, then its sensitivity measured and the budget's best
   per-tensor allocation found by the same knapsack `quantize --target-size` uses. The pilot is
   then quantized to that allocation and the file's KLD measured on the same held-out text: its
   quantization KLD is that increase (plus the proxy's term for llama.cpp's 8-bit rounding of
   activations, which a float forward does not make). The score is pilot KLD + quantization
   KLD. On the two 60 MB students distilled on 1M tokens the proxy alone read the quantization
   1.3-1.5x low, and lower for the 256-aligned student's k-quants (3.65 bits per weight: 0.187
   predicted, 0.277 measured) than for the teacher-width one's legacy types (4.27: 0.142,
   0.184): their pilots tied on it and the chooser picked the one that measured worse (1.56x
   the teacher's perplexity against 1.42x; bench/results/below_floor.md). A finalist whose
   pilot KLD alone is already above the best score is not quantized (its predicted term is shown).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from ..errors import PocketError
from .shapes import ALIGN, StudentShape, TeacherDims, default_kv_heads, gguf_shapes, non_embedding_params

# bits per weight: around Q3_K and Q4_K mixes. A third at ~5.5 (fewer parameters, more bits)
# came last in every pilot below SmolLM2's floor (60, 55 and 50 MB, bench/results/below_floor.md),
# by 2-4x the winner's score: its pilot's minutes are better spent on the teacher-width shape
LEVELS = (3.5, 4.5)
FLOAT_BPW = 99.0  # a distilled student is float: every candidate type is open to it


@dataclass(frozen=True)
class Candidate:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    non_embedding: int  # parameters
    matrix_params: int  # every quantized tensor's parameters, embedding included
    smallest: int  # bytes of its smallest file
    bpw: float  # mean bits per weight the budget leaves its quantized tensors
    file_budget: int = 0  # the file bytes the budget allows it (less than a memory budget: KV cache etc.)

    @property
    def label(self) -> str:
        return f"L{self.layers}-h{self.hidden}-a{self.heads}x{self.kv_heads}-f{self.ffn}"

    def shape_options(self) -> dict:
        """The `distill` options that make this student."""
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads,
                "ffn": self.ffn}

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


def _steps_down(top: int, floor: int, step: int) -> list[int]:
    out, v = [], top
    while v >= max(floor, 1):
        out.append(v)
        v -= step
    return out


def _head_options(t: TeacherDims, hidden: int) -> list[tuple[int, int]]:
    """(heads, kv heads) a student of this width may take: the teacher's own at an unaligned
    width (the teacher's, whose rows take no k-quants anyway); else the widest head count whose
    attention width is a multiple of 256 and that keeps whole key/value groups, and the widest
    of all when that one must copy key/value rows per head (more parameters, none new)."""
    if hidden % ALIGN:
        return [(t.heads, t.kv_heads)]
    fits = [(h, default_kv_heads(t, h)) for h in range(min(t.heads, hidden // t.head_dim), 0, -1)
            if (h * t.head_dim) % ALIGN == 0]
    whole = [(h, kv) for h, kv in fits if kv <= t.kv_heads]
    return list(dict.fromkeys(fits[:1] + whole[:1]))


def candidates(t: TeacherDims, budget: int, overhead: int, *, min_share: float = 0.5,
               ctx: int | None = None) -> list[Candidate]:
    """Every shape down to `min_share` of the teacher's widths and layers, with its size facts.
    `overhead`: the file's bytes besides tensor data (header, tokenizer, alignment). With `ctx`,
    `budget` is run-time memory at that context: each shape's file gets what its own KV cache
    and llama.cpp's buffers leave (runtime/memory.py)."""
    from ..quantize.budget import candidates as types_for_row
    from ..quantize.plan import tensor_bytes
    from ..runtime.memory import PROCESS_BYTES, Geometry, compute_bytes, kv_bytes

    def file_room(n: int, heads: int, kv: int) -> int:
        if ctx is None:
            return budget
        g = Geometry(n, heads, kv, t.head_dim, t.vocab)
        return budget - kv_bytes(g, ctx) - compute_bytes(g, ctx) - PROCESS_BYTES

    def widths(full: int) -> list[int]:  # aligned, about eight steps down to min_share
        step = max(ALIGN, round(full / 8 / ALIGN) * ALIGN)
        out = [w for w in _steps_down(full // ALIGN * ALIGN, 0, step) if w >= min_share * full]
        return [full] + out if full % ALIGN else out

    hiddens, ffns = widths(t.hidden), widths(t.ffn)
    layers = _steps_down(t.layers, -(-t.layers // 2), max(1, t.layers // 15))
    out = []
    for hidden in hiddens:
        for heads, kv in _head_options(t, hidden):
            for ffn in ffns:
                # sizes are per layer times layers: every decoder layer of a shape is alike
                one = StudentShape((0,), hidden, heads, kv, ffn)
                tensors = gguf_shapes(t, one)
                per_layer = [dims for name, dims in tensors if name.startswith("blk.")]
                rest = [dims for name, dims in tensors if not name.startswith("blk.")]

                def sizes(group):
                    fixed = sum(tensor_bytes("F32", d) for d in group if len(d) == 1)
                    least = sum(min(tensor_bytes(ty, d) for ty in types_for_row(d[-1], FLOAT_BPW))
                                for d in group if len(d) == 2)
                    return fixed, least, sum(d[0] * d[1] for d in group if len(d) == 2), len(group)

                lf, ll, lm, ln = sizes(per_layer)
                rf, rl, rm, rn = sizes(rest)
                for n in layers:
                    fixed = overhead + 32 * (rn + n * ln) + rf + n * lf
                    matrix = rm + n * lm
                    room = file_room(n, heads, kv)
                    out.append(Candidate(n, hidden, heads, kv, ffn, non_embedding_params(t, n, hidden, heads, kv, ffn),
                                         matrix, fixed + rl + n * ll, 8 * (room - fixed) / matrix, room))
    return [c for c in out if c.smallest <= c.file_budget]


def finalists(cands: list[Candidate], levels=LEVELS, keep: tuple[int, int] | None = None) -> list[Candidate]:
    """The largest candidate (most parameters; then more layers, wider rows) affording each bit
    level; then, with `keep` (the teacher's hidden width and heads), the largest that keeps both."""
    if not cands:
        return []

    def largest(able):
        return max(able, key=lambda c: (c.non_embedding, c.layers, c.hidden))

    picked: list[Candidate] = []
    for level in levels:
        able = [c for c in cands if c.bpw >= level]
        if able and (best := largest(able)) not in picked:
            picked.append(best)
    whole = [c for c in cands if keep and (c.hidden, c.heads) == keep]
    if whole and largest(whole) not in picked:
        picked.append(largest(whole))
    return picked or [max(cands, key=lambda c: c.bpw)]


def student_candidates(t: TeacherDims, overhead: int, budget: int,
                       ctx: int | None = None) -> tuple[list[Candidate], list[Candidate]]:
    """(all candidate shapes that fit the budget, the finalists among them); an error when none
    fits. With `ctx`, `budget` is run-time memory (see candidates)."""
    cands = candidates(t, budget, overhead, ctx=ctx)
    if not cands:
        smallest = min(candidates(t, 10**15, overhead), key=lambda c: c.smallest)
        what = f"{budget / 1e6:.1f} MB" + (f" of memory at --ctx {ctx}" if ctx else "")
        raise PocketError(f"{what} cannot hold even the smallest student pocketlm cuts from this model "
                          f"({smallest.label}: a {smallest.smallest / 1e6:.1f} MB file at its smallest types"
                          + (", plus its KV cache and llama.cpp's buffers" if ctx else "") + "); choose a larger budget")
    return cands, finalists(cands, keep=(t.hidden, t.heads))


def choose(finals: list[Candidate], pilot: Callable[[Candidate, float | None], dict],
           say: Callable[[str], None] = print) -> dict:
    """Score each finalist by `pilot(candidate, best score so far)` -> {"pilot_kld", "quant_kld",
    "quant_measured", ...}; the least pilot KLD + quantization KLD wins. Returns the table and
    the choice with its reason."""
    rows: list[dict] = []
    for c in finals:
        r = pilot(c, min((row["score"] for row in rows), default=None))
        rows.append({**c.to_dict(), **r, "score": r["pilot_kld"] + r["quant_kld"]})
        say(f"pilot {c.label}: KLD after healing {r['pilot_kld']:.3f} + quantization {r['quant_kld']:.3f} "
            f"({'measured' if r.get('quant_measured') else 'predicted'}) at {c.bpw:.2f} bits per weight = "
            f"{rows[-1]['score']:.3f}")
    best = min(rows, key=lambda r: r["score"])
    why = (f"{best['label']} ({best['non_embedding'] / 1e6:.1f}M non-embedding parameters at {best['bpw']:.2f} bits per "
           f"weight) scored lowest of {len(rows)} pilot heals: KLD {best['pilot_kld']:.3f} after healing + "
           f"{best['quant_kld']:.3f} {'measured' if best.get('quant_measured') else 'predicted'} for its file at the "
           f"budget = {best['score']:.3f}")
    others = [r for r in rows if r is not best]
    if others:
        why += "; the others: " + ", ".join(f"{r['label']} {r['score']:.3f}" for r in others)
    return {"pilots": rows, "chosen": best["label"], "shape": {k: best[k] for k in
                                                               ("layers", "hidden", "heads", "kv_heads", "ffn")},
            "why": why}


def table(cands: list[Candidate], finals: list[Candidate], limit: int = 12) -> list[list[str]]:
    """Rows for a printed table: the finalists first, then the largest of the rest."""
    rest = sorted((c for c in cands if c not in finals), key=lambda c: -c.non_embedding)[:max(0, limit - len(finals))]
    rows = [["layers", "hidden", "heads/kv", "ffn", "non-emb params", "smallest MB", "bpw", "final"]]
    for c in [*finals, *rest]:
        rows.append([str(c.layers), str(c.hidden), f"{c.heads}/{c.kv_heads}", str(c.ffn),
                     f"{c.non_embedding / 1e6:.1f}M", f"{c.smallest / 1e6:.1f}", f"{c.bpw:.2f}",
                     "✓" if c in finals else ""])
    return rows
