"""How much each tensor's quantization to each GGUF type costs, measured on calibration text.

Measuring the KL-divergence of every (tensor, type) pair alone would take ~1,000 forward
passes for a 135M model. Instead the cost is a calibrated proxy:

    predicted KLD(tensor, type) = gain[kind] * sum_j imp_j * sum_i (W_ij - Q(W)_ij)^2

where imp_j is the mean squared input activation of column j (so the sum is the expected
squared error of the tensor's output on calibration inputs, under a diagonal approximation),
and gain[kind] converts that error into KLD for each kind of tensor (attn_q, ffn_down, ...):
it is measured by quantizing all tensors of one kind to a coarse probe type and running the
model. bench/budget_vs_presets.py checks that the proxy ranks real files as their KLD does.
Results are cached by model bytes + calibration tokens.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..errors import PocketError
from ..util.atomic import write_json
from ..util.cache import cache_dir, model_content_hash
from .budget import Option
from .formats import get as get_format
from .methods.rtn import quantize_rtn
from .plan import fits, tensor_bytes

VERSION = 1
CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
PROBES = ("Q3_K", "Q4_0")  # the first that fits a tensor: coarse enough that its KLD clears the noise
GAIN_WINDOWS = 4
_LAYER = re.compile(r"^blk\.\d+\.(.+)\.weight$")


def kind_of(gguf_name: str) -> str:
    m = _LAYER.match(gguf_name)
    return m.group(1) if m else gguf_name.removesuffix(".weight")


@dataclass
class Sensitivity:
    tensors: dict  # GGUF name -> {"shape": [...], "errors": {type: weighted squared error}}
    gains: dict  # kind -> KLD per unit of weighted error
    fixed: dict  # GGUF name -> shape, for tensors kept in F32 (norms, biases)
    overhead: int  # header, metadata and alignment bytes
    n_params: int

    def loss(self, name: str, type_name: str) -> float:
        return self.gains[kind_of(name)] * self.tensors[name]["errors"][type_name]

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
        return {"version": VERSION, "tensors": self.tensors, "gains": self.gains, "fixed": self.fixed,
                "overhead": self.overhead, "n_params": self.n_params}


def measure(source, calib=(), calib_tokens: int = 8192, progress: bool = True, calib_ctx: int = 512) -> Sensitivity:
    """The sensitivity table of a model (cached after the first measurement)."""
    import gguf

    from ..models.export_gguf import cached_gguf
    from ..models.gguf_file import field_value, open_gguf
    from ..models.load import load
    from ..models.source import resolve
    from .pipeline import calibration_windows

    src = resolve(source)
    reader = open_gguf(cached_gguf(src, "f32"))
    loaded = load(src)
    windows = calibration_windows(loaded.tokenizer, loaded.add_bos, list(calib), calib_tokens, calib_ctx)
    key = hashlib.sha256(json.dumps([VERSION, CANDIDATES, model_content_hash(src)]).encode()
                         + b"".join(w.numpy().tobytes() for w in windows)).hexdigest()[:24]
    path = cache_dir() / "sensitivity" / f"{key}.json"
    if path.exists():
        d = json.loads(path.read_text())
        return Sensitivity(d["tensors"], d["gains"], d["fixed"], d["overhead"], d["n_params"])

    arch = field_value(reader, "general.architecture")
    n_layers = int(field_value(reader, f"{arch}.block_count", 0))
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_layers)
    shapes = {t.name: [int(x) for x in reversed(t.shape)] for t in reader.tensors}
    # A quantized source (the default model is Q4_1) gains nothing from a type above its own:
    # such types are left out, as `quantize` refuses them without --allow-requant.
    source_bpw = {t.name: (get_format(t.tensor_type.name).bits_per_weight
                           if t.tensor_type.name not in ("F32", "F16", "BF16") else 99.0) for t in reader.tensors}
    model = loaded.model.float().eval()
    tensors, probe = {}, {}  # probe: GGUF name -> (module, weights decoded from the probe type)

    def examine(gname: str, module, importance: np.ndarray | None):
        weight = module.weight.detach().float().numpy()
        imp = np.ones(weight.shape[1], np.float32) if importance is None else importance.astype(np.float32)
        errors = {}
        for type_name in CANDIDATES:
            if not fits(type_name, weight.shape[1]) or get_format(type_name).bits_per_weight > source_bpw[gname] + 1e-9:
                continue
            fmt = get_format(type_name)
            data = quantize_rtn(weight, fmt, importance)
            deq = fmt.dequantize(data.reshape(-1, fmt.type_size)).reshape(weight.shape)
            errors[type_name] = float((((weight - deq) ** 2).sum(0) * imp).sum())
            if type_name == next(p for p in PROBES if fits(p, weight.shape[1])):  # always allowed: <= 4.5 bpw
                probe[gname] = (module, torch.from_numpy(deq))
        tensors[gname] = {"shape": shapes[gname], "errors": errors}

    reference = _log_probs(model, windows[:GAIN_WINDOWS])

    def on_layer(i, stats):
        for rel, st in stats.items():
            gname = names.get_name(f"model.layers.{i}.{rel}")
            if gname and f"{gname}.weight" in shapes:
                module = model.get_submodule(f"{_layers_path(model)}.{i}.{rel}")
                examine(f"{gname}.weight", module, st.importance)
        return {}  # measure only: the model stays float

    from .calibrate import calibrate_layerwise

    final = calibrate_layerwise(model, windows, False, on_layer, progress)
    head = model.get_output_embeddings()
    examine("output.weight" if "output.weight" in shapes else "token_embd.weight", head, final.importance)
    if "output.weight" in shapes:  # an untied embedding: a lookup, every column alike
        examine("token_embd.weight", model.get_input_embeddings(), None)

    gains = {}
    kinds = sorted({kind_of(n) for n in tensors})
    for kind in tqdm(kinds, desc="sensitivity", unit="kind", disable=not progress):
        members = [n for n in tensors if kind_of(n) == kind]
        saved = {n: probe[n][0].weight.detach().clone() for n in members}
        with torch.no_grad():
            for n in members:
                probe[n][0].weight.copy_(probe[n][1])
            kld = _kld(reference, _log_probs(model, windows[:GAIN_WINDOWS]))
            for n in members:
                probe[n][0].weight.copy_(saved[n])
        error = sum(tensors[n]["errors"][_probe_type(tensors[n])] for n in members)
        gains[kind] = max(kld, 0.0) / error if error > 0 else 0.0
    fixed = {n: s for n, s in shapes.items() if n not in tensors}
    n_tensors = len(shapes)
    sens = Sensitivity(tensors, gains, fixed, int(reader.data_offset) + 32 * n_tensors,
                       sum(int(np.prod(s)) for s in shapes.values()))
    write_json(path, sens.to_json())
    return sens


def _probe_type(info: dict) -> str:
    return next(p for p in PROBES if p in info["errors"])


def _layers_path(model) -> str:
    for path in ("model.layers", "model.language_model.layers", "layers"):
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise PocketError("cannot find the decoder layers of this model")


def _log_probs(model, windows) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [torch.log_softmax(model(input_ids=w[None], use_cache=False).logits[0].float(), -1) for w in windows]


def _kld(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for p, q in zip(reference, candidate):
        total += float((p.exp() * (p - q)).sum())
        count += p.shape[0]
    return total / max(count, 1)
