"""Calibration tokens weighted by how much the model's output depends on each layer there.

gptq minimizes each layer's output error sum_t ||(W - Q) x_t||^2 with every calibration token
alike, though an error at the first positions (the attention sink) or at a token the model is
sure of moves the logits far less than one elsewhere. Weighting token t by the Fisher energy
of the output distribution at the layer's output, w_t = E_y ||d log p(y | t) / d out_t||^2 with
y drawn from the model itself (the Fisher of KL(p || q) at q = p: GuidedQuant, ICML 2025, in its
per-token form), makes gptq's H = sum_t w_t x_t x_t^T answer to the logits instead. Measured
(bench/results/fisher_gptq.md): the default model's Q4_0 0.61x plain gptq's mean KLD, Q4_K_M
0.69x; the off-grid 512-wide student's Q3_K_M and Q2_K 0.96x and 0.94x. It costs one backward
pass of the whole model over the calibration windows, so it needs the model whole in memory and
is offered up to qad's size limit only.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from ..errors import PocketError

SEED = 0  # the sampled y: a fixed seed, so a rerun makes the same file


def check(source, method: str) -> None:
    """Refuses, in a second, what --fisher cannot do: a method without gptq, a model too large to backprop whole."""
    from ..distill.signals import FULL_MAX_PARAMS
    from ..models.source import resolve
    from ..models.tensors import open_tensors

    if method not in ("gptq", "qad"):
        raise PocketError(f"--fisher weighs gptq's calibration tokens: it needs --method gptq or qad, not {method}")
    n_params = open_tensors(resolve(source)).n_params()
    if n_params > FULL_MAX_PARAMS:
        raise PocketError(f"--fisher needs a backward pass of the whole model, offered up to {FULL_MAX_PARAMS / 1e9:.0f}B "
                          f"parameters (this one has {n_params / 1e9:.1f}B); quantize without it")


def token_weights(source, windows: list[torch.Tensor], progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {Linear's name in the layer: (windows, positions) weights}}. Linears fed the same
    input (q/k/v, gate/up) share one Hessian in calibrate.py, so they get one weight: the mean of
    their energies, each first scaled to mean 1 (a wide output would otherwise outvote the rest).
    Every group's weights have mean 1 over all calibration tokens, so H keeps its scale."""
    from ..models.load import load
    from .calibrate import _decoder_layers

    model = load(source).model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _, layers = _decoder_layers(model)
    energy: dict[tuple[int, str], list[torch.Tensor]] = {}
    groups: dict[tuple[int, str], str] = {}  # Linear -> the first Linear that saw the same input
    last: dict = {}

    def watch(i: int, rel: str) -> tuple[Callable, Callable]:
        def pre(module, args):
            if last.get("input") is args[0] and last.get("layer") == i:
                groups.setdefault((i, rel), last["rel"])
            else:
                groups.setdefault((i, rel), rel)
                last.update(input=args[0], layer=i, rel=rel)

        def post(module, args, out):
            def grad(g):
                energy.setdefault((i, rel), []).append((g.detach().float() ** 2).sum(-1)[0])
            out.register_hook(grad)
        return pre, post

    handles = []
    for i, layer in enumerate(layers):
        for rel, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                pre, post = watch(i, rel)
                handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    emb = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(SEED)
    try:
        for ids in tqdm(windows, desc="fisher", unit="window", disable=not progress):
            last.clear()
            x = emb(ids[None]).detach().requires_grad_(True)  # the graph starts here: no parameter needs a gradient
            logits = model(inputs_embeds=x, use_cache=False).logits[0].float()
            y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)[:, 0]
            torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    del model
    members: dict[tuple[int, str], list[str]] = {}
    for (i, rel), lead in groups.items():
        members.setdefault((i, lead), []).append(rel)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for (i, _), rels in members.items():
        w = _unit_mean(sum(_unit_mean(torch.stack(energy.pop((i, r)))) for r in rels) / len(rels))
        out.setdefault(i, {}).update({r: w for r in rels})
    return out


def _unit_mean(e: torch.Tensor) -> torch.Tensor:
    e = e.clamp_min(1e-12)  # a token no gradient reached still counts a little (gptq needs H positive definite)
    return e / e.mean()
