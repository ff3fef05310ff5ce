"""Calibration statistics, gathered one decoder layer at a time.

The inputs of layer 0 are captured for every calibration window; then each layer in turn is
run over them with hooks on its Linear modules (collecting mean x^2 per input channel and
H = X^T X), handed to a callback that quantizes it, and run again with the callback's
dequantized weights to produce the next layer's inputs (GPTQ's sequential scheme: later
layers calibrate on what the quantized earlier layers really produce). Peak memory is the
model plus one layer's statistics plus the hidden states of the calibration windows (those
beyond a memory limit in a temporary file: quantize/hidden.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..util.machine import return_freed_memory
from .hidden import HiddenStates


@dataclass
class LinearStats:
    sq_sum: torch.Tensor  # (in,) sum of x^2 over tokens
    xtx: torch.Tensor | None  # (in, in) sum of x x^T, when a Hessian is wanted
    tokens: int = 0
    act_err: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (in,) summed activation_rounding

    @property
    def importance(self) -> np.ndarray:
        return (self.sq_sum / max(self.tokens, 1)).cpu().numpy()

    def activation_error(self) -> dict[int, np.ndarray]:
        """Mean squared 8-bit rounding error per input channel, by activation block size."""
        return {b: (e / max(self.tokens, 1)).cpu().numpy() for b, e in self.act_err.items()}

    def add(self, x: torch.Tensor, want_hessian: bool, act_blocks: Sequence[int], weight: torch.Tensor | None = None) -> None:
        """Accumulates the inputs x (tokens, in) into every statistic wanted; `weight` (tokens,)
        weighs each token's share of the Hessian (fisher.py), not of the importance."""
        self.sq_sum += (x * x).sum(0)
        if want_hessian:
            xw = x if weight is None else x * weight.to(x.device).sqrt()[:, None]
            self._xtx().addmm_(xw.T, xw)
        for b in act_blocks:
            if x.shape[1] % b == 0:
                e = activation_rounding(x, b)
                self.act_err[b] = self.act_err[b] + e if b in self.act_err else e
        self.tokens += x.shape[0]

    def _xtx(self) -> torch.Tensor:
        if self.xtx is None:
            raise RuntimeError("these statistics hold no Hessian: collected without one, or already taken")
        return self.xtx

    def take_hessian(self) -> torch.Tensor:
        """H = X^T X / n made from the accumulator itself, which is given up: for the last
        tensor that uses these statistics, no copy of the Hessian is made. It stays on the
        device it was gathered on: gptq runs there (a GPU's sweep is seconds where 2 cores take minutes)."""
        xtx, self.xtx = self._xtx(), None
        return xtx.div_(max(self.tokens, 1))

    def copy_hessian(self) -> torch.Tensor:
        """H = X^T X / n as a new tensor on the statistics' device, the accumulator kept for the
        other tensors that share it (the same values as `take_hessian`)."""
        return self._xtx() / max(self.tokens, 1)


def activation_rounding(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per column of x (tokens, width), the summed squared error of rounding each row to 8 bits
    in blocks of `block` values with one scale max|x|/127 per block: what llama.cpp's quantized
    dot products do to their input (Q8_0 with 32-value blocks, Q8_K with 256). Outlier channels
    make the 256-value blocks' error several times the 32-value ones'."""
    err = x - round_activations(x, block)
    return (err * err).sum(0)


def round_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x rounded to 8 bits in blocks of `block` values along its last axis, one scale
    max|x|/127 per block."""
    rows = x.reshape(-1, block)
    d = rows.abs().amax(1, keepdim=True) / 127
    return (torch.round(rows / torch.where(d > 0, d, 1)) * d).reshape(x.shape)


class _StopForward(Exception):
    pass


def _decoder_layers(model):
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    return inner, inner.layers


def _capture_layer_inputs(model, windows: list[torch.Tensor]):
    """Hidden states entering layer 0 for every window, and each layer's keyword arguments
    (rotary embeddings, masks: the same for all windows of one length). The decoder layers
    are bypassed while this runs, so they need not hold weights yet."""
    inner, layers = _decoder_layers(model)
    kwargs_by_layer: list[dict | None] = [None] * len(layers)
    inputs = HiddenStates()

    def record(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if kwargs_by_layer[i] is None:
                kwargs_by_layer[i] = dict(kwargs)
            if i == 0:
                inputs.append(hidden.detach())
            if i == len(layers) - 1:
                raise _StopForward
        return hook

    def passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:
        layer.forward = passthrough
    try:
        with torch.inference_mode():
            for ids in windows:
                try:
                    model(input_ids=ids[None], use_cache=False)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            del layer.forward
    captured: list[dict] = []
    for i, kw in enumerate(kwargs_by_layer):
        if kw is None:
            raise RuntimeError(f"decoder layer {i} was not reached while its inputs were captured")
        kw.pop("hidden_states", None)
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kw["use_cache"] = False
        captured.append(kw)
    return inputs, captured


def layer_output(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A decoder layer's hidden states out (some transformers versions return a tuple)."""
    res = layer(hidden, **kwargs)
    return res[0] if isinstance(res, tuple) else res


def _run_layer(layer, hidden: Sequence[torch.Tensor], kwargs: dict) -> HiddenStates:
    with torch.inference_mode():
        return HiddenStates.of(layer_output(layer, hs, kwargs) for hs in hidden)


def _run_for_hooks(layer, hidden: Sequence[torch.Tensor], kwargs: dict, seen: dict) -> None:
    """The layer over every window for what its hooks collect: no second set of hidden states.
    The first window runs whole while the hooks record the order the Linears see their inputs
    in; the later ones stop at the last Linear's input, since nothing after it is collected (at
    8B its matmul, ffn_down's, is a quarter of the layer's flops)."""
    with torch.inference_mode():
        for k, hs in enumerate(hidden):
            seen["window"] = k
            try:
                layer_output(layer, hs, kwargs)
            except _StopForward:
                pass
            if k == 0:
                order = seen.pop("order")
                seen["stop_at"] = order[-1] if order and len(set(order)) == len(order) else None


def calibrate_layerwise(model, windows: list[torch.Tensor], want_hessian: bool,
                        on_layer: Callable[[int, dict[str, LinearStats]], dict[str, torch.Tensor]],
                        progress: bool = True, stream=None, visit=None, release: bool = False,
                        act_blocks: Sequence[int] = (), token_weights: dict | None = None) -> LinearStats:
    """Calls on_layer(i, {module name within layer: stats}) for each layer; it returns new
    weights {module name: tensor} to load before the layer's outputs are propagated, or yields
    (module name, tensor) pairs, each loaded as it comes.
    Returns the statistics of the final normed hidden states (the output projection's input).
    With a LayerStream (models/layers.py) `model` is its weightless skeleton: each layer is
    loaded for its turn and dropped after it, so only one is ever in memory. visit(i, layer,
    kwargs, hidden) runs while layer i is loaded, before its outputs are propagated.
    release (with a stream, for an on_layer that reads no weight from the layer): the layer's
    weights are dropped while on_layer runs and the layer is rebuilt from the new weights and
    the checkpoint's other tensors after it, so quantizing a layer never holds the layer too
    (0.9 GB of float32 at 8B, beside gptq's two ffn_down Hessians).
    act_blocks: also gather each input's activation_rounding error for these block sizes.
    token_weights: {layer: {Linear's name: (windows, positions)}}, each token's weight in the
    Hessians (fisher.py); None: every token alike."""
    if stream is not None:
        windows = stream.embed_only(windows)
    hidden, kwargs_by_layer = _capture_layer_inputs(model, windows)
    inner, layers = _decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc="calibrate+quantize", unit="layer", disable=not progress)):
        if stream is not None:
            stream.load(layer)
        stats: dict[str, LinearStats] = {}
        handles: list = []
        last_input: dict = {}
        seen: dict = {"order": []}
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                handles.append(mod.register_forward_pre_hook(
                    _accumulator(stats, name, mod.in_features, want_hessian, last_input, seen, act_blocks,
                                 None if token_weights is None else token_weights[i][name])))
        try:
            _run_for_hooks(layer, hidden, kwargs_by_layer[i], seen)
        finally:
            for h in handles:
                h.remove()
            last_input.clear()
        new_weights = on_layer(i, stats)
        pairs = new_weights.items() if isinstance(new_weights, dict) else new_weights
        if release and stream is not None:
            stream.unload(layer)
            return_freed_memory()
            stream.load(layer, given={f"{name}.weight": weight for name, weight in pairs})
        else:
            with torch.no_grad():
                for name, weight in pairs:
                    layer.get_submodule(name).weight.copy_(weight)
                    del weight
        if visit is not None:
            visit(i, layer, kwargs_by_layer[i], hidden)
        hidden = _run_layer(layer, hidden, kwargs_by_layer[i])
        if stream is not None:
            stream.unload(layer)
            return_freed_memory()
    if stream is not None:
        stream.load(inner.norm)
    final = LinearStats(torch.zeros(hidden[0].shape[-1], dtype=torch.float64, device=hidden[0].device), None)
    with torch.inference_mode():
        for hs in hidden:
            x = inner.norm(hs).reshape(-1, hs.shape[-1]).double()
            final.add(x, False, act_blocks)
    final.sq_sum = final.sq_sum.float()
    return final


def _accumulator(stats: dict, name: str, width: int, want_hessian: bool, last: dict, seen: dict,
                 act_blocks: Sequence[int] = (), weights: torch.Tensor | None = None):
    """Linears fed the same tensor (q/k/v, gate/up) share one LinearStats: X^T X is the
    costliest part of calibration, so it is computed once per distinct input. `last` holds the
    previous hook's input by reference (not address, which a freed tensor's successor reuses).
    A pre-hook (only the input is wanted); `seen` is _run_for_hooks's record of the Linears'
    order, and the last one's hook ends the forward pass once it has collected."""
    def hook(module, args):
        if "order" in seen:
            seen["order"].append(name)
        _collect(args)
        if seen.get("stop_at") == name:
            raise _StopForward

    def _collect(args):
        if last.get("input") is args[0] and last["stats"].sq_sum.shape[0] == width:
            stats[name] = last["stats"]
            return
        x = args[0].detach().reshape(-1, width).float()
        st = stats.get(name)
        if st is None:
            dev = x.device
            with torch.inference_mode(False):  # ordinary tensors, so gptq may later reuse X^T X in place
                st = stats[name] = LinearStats(torch.zeros(width, device=dev),
                                               torch.zeros(width, width, device=dev) if want_hessian else None)
        st.add(x, want_hessian, act_blocks, None if weights is None else weights[seen["window"]])
        last["input"], last["stats"] = args[0], st
    return hook
