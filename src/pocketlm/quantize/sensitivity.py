"""How much each tensor's quantization to each GGUF type costs, measured on calibration text.

Measuring the KL-divergence of every (tensor, type) pair alone would take ~1,000 forward
passes for a 135M model. Instead the cost is a calibrated proxy:

    predicted KLD(tensor, type) = gain[kind] * sum_j imp_j * sum_i (W_ij - Q(W)_ij)^2

where imp_j is the mean squared input activation of column j (so the sum is the expected
squared error of the tensor's output on calibration inputs, under a diagonal approximation),
and gain[kind] converts that error into KLD for each kind of tensor (attn_q, ffn_down, ...):
it is measured by quantizing all tensors of one kind to a coarse probe type and running the
model. bench/budget_vs_presets.py checks that the proxy ranks real files as their KLD does.

A file's error is not the weights' alone: llama.cpp rounds each quantized matmul's input to 8
bits, one scale per 32 values for the legacy types and per 256 for the k-quants (their Q8_K
blocks). On the 256-aligned student that runtime floor is 0.005 KLD for a Q8_0 file and 0.026
for a Q6_K one (bench/results/kernel_floor.md), as large as a 5-bit weight error, and the weight
term alone made budgets buy k-quants that measured worse than legacy types. So each tensor's
loss adds   gain[kind] * sum_j ||W_:,j||^2 * E[(x_j - q8(x)_j)^2]   for its type's activation
block (calibrate.activation_rounding), the same output-error measure as the weight term, with
its own gain per kind: per-token rounding noise costs far less KLD than a weight error of equal
size (attention averages it over tokens; the softmax ignores what moves every logit alike: with
the weight term's gains the aligned student's Q8_K floor was predicted 2-5x too high), so each
kind's inputs are also rounded alone in the gain windows, at the widest block that fits them.
Results are cached by model bytes + calibration tokens.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..errors import PocketError
from ..util.atomic import write_json
from ..util.cache import cache_dir, code_version, model_content_hash
from .budget import CANDIDATES, Option, candidates, source_bpw_of
from .calibrate import round_activations
from .formats import get as get_format
from .formats.base import codec_fingerprint
from .methods.rtn import quantize_rtn
from .plan import fits, tensor_bytes

PROBES = ("Q3_K", "Q4_0")  # the first that fits a tensor: coarse enough that its KLD clears the noise
GAIN_WINDOWS = 4
_LAYER = re.compile(r"^blk\.\d+\.(.+)\.weight$")


def kind_of(gguf_name: str) -> str:
    m = _LAYER.match(gguf_name)
    return m.group(1) if m else gguf_name.removesuffix(".weight")


@dataclass
class Sensitivity:
    tensors: dict  # GGUF name -> {"shape": [...], "errors": {type: weighted squared error},
    #                 "act_errors": {activation block: its output error}} (absent: a lookup, no matmul)
    gains: dict  # kind -> KLD per unit of weighted error
    fixed: dict  # GGUF name -> shape, for tensors kept in F32 (norms, biases)
    overhead: int  # header, metadata and alignment bytes
    n_params: int
    act_gains: dict = field(default_factory=dict)  # kind -> KLD per unit of activation rounding error

    def loss(self, name: str, type_name: str) -> float:
        return self.gains[kind_of(name)] * self.tensors[name]["errors"][type_name] + self._runtime(name, type_name)

    def _runtime(self, name: str, type_name: str) -> float:
        """The predicted KLD of llama.cpp rounding this tensor's input to 8 bits for `type_name`."""
        runtime = self.tensors[name].get("act_errors", {}).get(str(get_format(type_name).activation_block), 0.0)
        return self.act_gains.get(kind_of(name), 0.0) * runtime

    def runtime_kld(self, types: dict[str, str]) -> float:
        """The part of predicted_kld that is activation rounding, not the weights' error."""
        return float(sum(self._runtime(n, types[n]) for n in self.tensors))

    def options(self) -> dict[str, list[Option]]:
        return {name: [Option(t, tensor_bytes(t, info["shape"]), self.loss(name, t)) for t in info["errors"]]
                for name, info in self.tensors.items()}

    @property
    def fixed_bytes(self) -> int:
        return sum(tensor_bytes("F32", s) for s in self.fixed.values())

    def file_bytes(self, types: dict[str, str]) -> int:
        return self.overhead + self.fixed_bytes + sum(tensor_bytes(types[n], i["shape"]) for n, i in self.tensors.items())

    def predicted_kld(self, types: dict[str, str]) -> float:
        return float(sum(self.loss(n, types[n]) for n in self.tensors))

    def to_json(self) -> dict:
        return {"tensors": self.tensors, "gains": self.gains, "fixed": self.fixed,
                "overhead": self.overhead, "n_params": self.n_params, "act_gains": self.act_gains}


def measure(source, calib=(), calib_tokens: int = 8192, progress: bool = True, calib_ctx: int = 512) -> Sensitivity:
    """The sensitivity table of a model (cached after the first measurement).

    One streamed sweep over the decoder layers (one layer in memory) gathers the statistics,
    measures every (tensor, type) error, and carries the gain windows' hidden states through
    each layer once per tensor kind with that kind's tensors at the probe type; the embedding's
    kind, whose probe may depend on the final statistics, gets a second sweep of those windows."""
    from ..models.export_gguf import header_bytes
    from ..models.layers import LayerStream
    from ..models.source import resolve
    from ..models.tensors import open_tensors
    from .calibrate import calibrate_layerwise
    from .pipeline import calibration_windows

    src = resolve(source)
    ts = open_tensors(src)
    layers = LayerStream(src)
    windows = calibration_windows(layers.tokenizer, layers.add_bos, list(calib), calib_tokens, calib_ctx)
    key = hashlib.sha256(json.dumps([code_version("quantize", "models"), codec_fingerprint(), CANDIDATES,
                                     model_content_hash(src)]).encode()
                         + b"".join(w.numpy().tobytes() for w in windows)).hexdigest()[:24]
    path = cache_dir() / "sensitivity" / f"{key}.json"
    if path.exists():
        d = json.loads(path.read_text())
        return Sensitivity(d["tensors"], d["gains"], d["fixed"], d["overhead"], d["n_params"], d["act_gains"])

    names = ts.facts.name_map()
    shapes = {n: list(ts.shape(n)) for n in ts.names}
    # A quantized source (the default model is Q4_1) gains nothing from a type above its own:
    # such types are left out, as `quantize` refuses them without --allow-requant.
    source_bpw = {n: source_bpw_of(e) for n, e in ts.entries.items()}
    tensors: dict = {}
    head_name = "output.weight" if "output.weight" in shapes else "token_embd.weight"
    layer_kinds = sorted({kind_of(n) for n, s in shapes.items() if len(s) == 2 and n.startswith("blk.")})
    gain = _GainSets(layer_kinds)

    def on_layer(i, stats):
        gain.probes.clear()
        for rel, st in stats.items():
            gname = names.get_name(f"model.layers.{i}.{rel}")
            if gname and f"{gname}.weight" in shapes:
                gname = f"{gname}.weight"
                weight = layers.layers[i].get_submodule(rel).weight.detach().float().numpy()
                tensors[gname] = {"shape": shapes[gname], "errors": {},
                                  "act_errors": _activation_errors((weight * weight).sum(0), st)}
                probe = _examine(tensors[gname]["errors"], weight, st.importance, source_bpw[gname])
                gain.probes[rel] = (kind_of(gname), torch.from_numpy(probe))
        return {}  # measure only: the model stays float

    final = calibrate_layerwise(layers.model, windows, False, on_layer, progress, stream=layers, visit=gain.visit,
                                act_blocks=ACTIVATION_BLOCKS)
    head = _HeadRows(layers, head_name, final.importance, source_bpw[head_name])
    tensors[head_name] = {"shape": shapes[head_name], "errors": head.errors,
                          "act_errors": _activation_errors(head.col_sq, final)}
    embed = head  # tied: the embedding's probe is the head's
    gain_ids = torch.unique(torch.cat([w.reshape(-1) for w in windows[:GAIN_WINDOWS]]))  # the tokens the gain windows read
    if head_name == "output.weight":  # an untied embedding: a lookup, every column alike
        embed = _HeadRows(layers, "token_embd.weight", None, source_bpw["token_embd.weight"], keep=gain_ids)
        tensors["token_embd.weight"] = {"shape": shapes["token_embd.weight"], "errors": embed.errors}
    embed_final = _probe_embedding_sweep(layers, windows[:GAIN_WINDOWS], gain_ids, embed, progress)
    klds = gain.kld(layers, head, embed_final, tied=head is embed, head_block=_act_block(shapes[head_name][-1]))
    gains: dict[str, float] = {}
    act_gains: dict[str, float] = {}
    for kind, kld in klds.items():
        act = kind.startswith("act:")
        kind = kind.removeprefix("act:")
        members = [n for n in tensors if kind_of(n) == kind]
        if act:
            error = sum(tensors[n]["act_errors"][str(_act_block(tensors[n]["shape"][-1]))] for n in members)
        else:
            error = sum(tensors[n]["errors"][_probe_type(tensors[n])] for n in members)
        (act_gains if act else gains)[kind] = max(kld, 0.0) / error if error > 0 else 0.0
    fixed = {n: s for n, s in shapes.items() if n not in tensors}
    sens = Sensitivity(tensors, gains, fixed, header_bytes(ts) + 32 * len(shapes),
                       sum(int(np.prod(s)) for s in shapes.values()), act_gains)
    write_json(path, sens.to_json())
    return sens


ACTIVATION_BLOCKS = tuple(sorted({get_format(t).activation_block for t in CANDIDATES}))


def _act_block(width: int) -> int:
    """The activation block a kind's gain is measured at: the widest that splits its inputs
    (the k-quants' 256 on aligned models, where the choice between families is made)."""
    return max(b for b in ACTIVATION_BLOCKS if width % b == 0)


def _activation_errors(col_sq: np.ndarray, stats) -> dict[str, float]:
    """The output error of rounding this tensor's input to 8 bits, per activation block size:
    sum_j ||W_:,j||^2 E[dx_j^2], as the weight term is sum_j E[x_j^2] ||dW_:,j||^2."""
    return {str(b): float((col_sq.astype(np.float64) * e).sum()) for b, e in stats.activation_error().items()}


def _probe_type(info: dict) -> str:
    return next(p for p in PROBES if p in info["errors"])


HEAD_BLOCK = 1 << 26  # head values handled whole; SmolLM2's head fits, so small models compute
# exactly as a whole-model forward would. Bigger heads are handled in row blocks of EXAMINE_BLOCK
# values: a candidate type's quantize and decode make ~8 float32-sized temporaries of a block
# (3B's head in 64M-value blocks peaked near 5 GB), and their probe is kept in bf16 (an
# approximation of the proxy's gain only; the errors stay exact).
EXAMINE_BLOCK = 1 << 23


def _examine(errors: dict, weight: np.ndarray, importance: np.ndarray | None, source_bpw: float) -> np.ndarray:
    """Adds each candidate type's weighted error of `weight` (rows, cols) into `errors`;
    returns the weights decoded from the probe type."""
    imp = np.ones(weight.shape[1], np.float32) if importance is None else importance.astype(np.float32)
    probe_type = next(p for p in PROBES if fits(p, weight.shape[1]))
    allowed = candidates(weight.shape[1], source_bpw)
    if probe_type not in allowed:  # a source already quantized below ~3.4 bpw
        raise PocketError(f"a tensor is stored at {source_bpw:.2f} bits per weight, below {probe_type}: a size budget "
                          "has nothing to choose among; quantize the float model instead")
    probe: np.ndarray = np.empty(0)
    for type_name in allowed:
        fmt = get_format(type_name)
        deq = fmt.dequantize(quantize_rtn(weight, fmt, importance).reshape(-1, fmt.type_size)).reshape(weight.shape)
        errors[type_name] = errors.get(type_name, 0.0) + float((((weight - deq) ** 2).sum(0) * imp).sum())
        if type_name == probe_type:
            probe = deq
    return probe


class _HeadRows:
    """The output projection (or the embedding), read in row blocks of the checkpoint: its
    errors per type, and what the gain windows need of it. A head that fits HEAD_BLOCK is kept
    whole, weights and probe in float32. A bigger one keeps only its probe, in bf16, and its
    weights are read from the checkpoint again, block by block, once per gain window
    (_streamed_kld): holding both would take 1.6 GB at 3B's vocabulary (2.1 at 8B's). `keep`
    (sorted token ids) keeps only those rows of the probe: all an untied embedding's probe is
    needed for."""

    def __init__(self, layers, gguf_name: str, importance, source_bpw: float, keep: torch.Tensor | None = None):
        self.layers, self.hf_name = layers, layers.hf_name_of(gguf_name)
        rows, cols = layers.tensors.entries[gguf_name].shape
        self.rows = rows
        self.whole = rows * cols <= HEAD_BLOCK
        self.step = step = rows if self.whole else max(1, EXAMINE_BLOCK // cols)
        self.keep = keep
        self.errors: dict = {}
        self.weight, self.probe = [], []
        self.col_sq = np.zeros(cols, np.float64)
        for r0 in range(0, rows, step):
            block = self._stored(r0).float()
            self.col_sq += (block.double() ** 2).sum(0).numpy()
            probe = torch.from_numpy(_examine(self.errors, block.numpy(), importance, source_bpw))
            if keep is not None:
                probe = probe[keep[(keep >= r0) & (keep < r0 + step)] - r0]
            if self.whole and keep is None:  # a kept-rows embedding is never the head
                self.weight.append(block)
            self.probe.append(probe if self.whole else probe.to(torch.bfloat16))

    def _stored(self, r0: int) -> torch.Tensor:
        return self.layers.tensors.hf_tensor(self.hf_name, slice(r0, min(r0 + self.step, self.rows)))

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (sorted) of the probe weights, float32: the probed embedding of those tokens."""
        if self.keep is not None:
            if not torch.equal(ids, self.keep):
                raise ValueError("rows_of: only the rows kept can be asked for")
            return torch.cat(self.probe).float()
        return torch.cat([self.probe[b][ids[ids // self.step == b] - b * self.step].float()
                          for b in range(len(self.probe))])

    def logits(self, h: torch.Tensor, probe: bool) -> torch.Tensor:
        """A whole head's logits (a head in blocks is read by _streamed_kld, block by block)."""
        return torch.nn.functional.linear(h, self.probe[0] if probe else self.weight[0])


class _GainSets:
    """Hidden states of the gain windows, one set per tensor kind plus the reference, carried
    through each layer while it is loaded: kind k's set sees kind k's tensors at the probe type."""

    def __init__(self, kinds: list[str]):
        self.kinds = kinds
        self.sets: dict[str, Sequence[torch.Tensor]] = {}
        self.probes: dict[str, tuple[str, torch.Tensor]] = {}  # module name in layer -> (kind, probe weights)

    def visit(self, i, layer, kwargs, hidden):
        from .calibrate import _run_layer

        if i == 0:
            self.sets = {k: hidden[:GAIN_WINDOWS] for k in ["", *self.kinds, *(f"act:{k}" for k in self.kinds)]}
        for key in list(self.sets):
            kind = key.removeprefix("act:")
            members = {rel: w for rel, (k, w) in self.probes.items() if k == kind}
            if key.startswith("act:"):  # the kind's inputs rounded as llama.cpp rounds them, weights exact
                handles = [self._round_inputs(layer.get_submodule(rel)) for rel in members]
                try:
                    self.sets[key] = _run_layer(layer, self.sets[key], kwargs)
                finally:
                    for h in handles:
                        h.remove()
                continue
            saved = {rel: layer.get_submodule(rel).weight.detach().clone() for rel in members}
            with torch.no_grad():
                for rel, w in members.items():
                    layer.get_submodule(rel).weight.copy_(w)
                self.sets[key] = _run_layer(layer, self.sets[key], kwargs)
                for rel, w in saved.items():
                    layer.get_submodule(rel).weight.copy_(w)

    @staticmethod
    def _round_inputs(module):
        block = _act_block(module.in_features)
        return module.register_forward_pre_hook(lambda mod, args: (round_activations(args[0], block), *args[1:]))

    def kld(self, layers, head: _HeadRows, embed_final: Sequence[torch.Tensor], tied: bool,
            head_block: int) -> dict[str, float]:
        """Mean KLD against the reference over the gain windows, per kind: each layer kind's
        set; the embedding's sweep (with the probed head too when tied); the probed head alone;
        and for every kind that is a matmul, its inputs rounded to 8 bits ("act:" + kind)."""
        norm = layers.inner.norm
        cap = getattr(layers.text_config, "final_logit_softcapping", None)

        def normed(hs, rounded=False):
            with torch.inference_mode():
                h = norm(hs)[0]
                return round_activations(h, head_block) if rounded else h

        def log_probs(h, probe):
            with torch.inference_mode():
                return torch.log_softmax(_capped(head.logits(h, probe), cap).float(), -1)

        # kind -> (final hidden states, probed head?, head input rounded?)
        cases = {k: (self.sets[k], False, False) for k in self.sets if k}
        cases["token_embd"] = (embed_final, tied, False)
        if not tied:
            cases["output"] = (self.sets[""], True, False)
        cases["act:" + ("token_embd" if tied else "output")] = (self.sets[""], False, True)
        totals, count = {k: 0.0 for k in sorted(cases)}, 0
        for w, ref_hs in enumerate(self.sets[""]):
            if not head.whole:  # a head in blocks: one pass over them for every case
                with torch.inference_mode():
                    sums = _streamed_kld(head, normed(ref_hs), {k: (normed(f[w], r), pr) for k, (f, pr, r) in cases.items()}, cap)
                count += int(ref_hs.shape[-2])
                totals = {k: totals[k] + sums[k] for k in totals}
                continue
            p = log_probs(normed(ref_hs), False)
            count += p.shape[0]
            for kind in totals:
                finals, probe, rounded = cases[kind]
                totals[kind] += float((p.exp() * (p - log_probs(normed(finals[w], rounded), probe))).sum())
        return {k: v / max(count, 1) for k, v in totals.items()}


def _capped(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(z / cap) * cap if cap else z


def _streamed_kld(head: _HeadRows, ref: torch.Tensor, others: dict[str, tuple[torch.Tensor, bool]],
                  cap: float | None) -> dict[str, float]:
    """Sum over ref's tokens of KL(softmax(ref's logits) || softmax(each other's)), in one pass
    over the head's row blocks (its probe where an other's flag says so). Whole (tokens,
    vocabulary) arrays, several alive at once, held ~1.7 GB at 3B's vocabulary. Uses
    KL = sum p (z - y) - log s_z + log s_y, every s a sum of exp(logit - m) against one running
    maximum m over all cases (rescaled as m grows, as online softmax does), so no two large
    log-sum-exps are subtracted."""
    f64 = torch.float64
    m = torch.full((ref.shape[0],), -torch.inf, dtype=f64)
    s_ref = torch.zeros_like(m)
    s, a = {k: torch.zeros_like(m) for k in others}, {k: torch.zeros_like(m) for k in others}
    for b, r0 in enumerate(range(0, head.rows, head.step)):
        weight, probe = head._stored(r0).float(), head.probe[b].float()
        z = _capped(torch.nn.functional.linear(ref, weight), cap)
        y = {k: _capped(torch.nn.functional.linear(h, probe if p else weight), cap) for k, (h, p) in others.items()}
        m_new = torch.maximum(m, torch.stack([z.amax(1), *(v.amax(1) for v in y.values())]).amax(0).to(f64))
        rescale, shift = torch.exp(m - m_new), m_new.float()[:, None]
        e = torch.exp(z - shift)
        s_ref = s_ref * rescale + e.sum(1, dtype=f64)
        for k, v in y.items():
            s[k] = s[k] * rescale + torch.exp(v - shift).sum(1, dtype=f64)
            a[k] = a[k] * rescale + (e * (z - v)).sum(1, dtype=f64)
        m = m_new
    return {k: float((a[k] / s_ref - torch.log(s_ref) + torch.log(s[k])).sum()) for k in others}


def _probe_embedding_sweep(layers, windows, ids: torch.Tensor, embed: _HeadRows, progress: bool) -> Sequence[torch.Tensor]:
    """The gain windows through every layer with the token embedding at its probe type; `ids`
    are the windows' distinct tokens, sorted (the rows embed_only renumbers them into)."""
    from .calibrate import _capture_layer_inputs, _run_layer

    remapped = layers.embed_only(windows)
    emb = layers.model.get_input_embeddings()
    emb.weight = torch.nn.Parameter(embed.rows_of(ids), requires_grad=False)
    hidden, kwargs_by_layer = _capture_layer_inputs(layers.model, remapped)
    for i, layer in enumerate(tqdm(layers.layers, desc="sensitivity (embedding)", unit="layer", disable=not progress)):
        layers.load(layer)
        hidden = _run_layer(layer, hidden, kwargs_by_layer[i])
        layers.unload(layer)
    return hidden
