"""Activation importance of the teacher's layers, channels, heads and MLP units (Minitron).

One forward pass over calibration sequences with hooks:
- layer: 1 - mean cosine(input, output) of each decoder block ("block influence"): a block
  that barely turns its input is the cheapest to drop;
- hidden channel: mean |activation| of every RMSNorm output, summed over all norms (the
  residual stream's channels are shared by every layer, so they are ranked once);
- attention head: mean L2 norm of the head's output entering o_proj;
- MLP unit: mean |activation| entering down_proj.
Weight magnitudes ignore what the data does through the network; these scores measure it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm


@dataclass
class Importance:
    layer: torch.Tensor  # (L,)
    channel: torch.Tensor  # (hidden,)
    head: torch.Tensor  # (L, heads)
    unit: torch.Tensor  # (L, ffn)

    def layer_order(self) -> list[int]:
        """Teacher layers from most to least important."""
        return torch.argsort(self.layer, descending=True, stable=True).tolist()


def measure(model, sequences: torch.Tensor, batch: int = 4, progress: bool = True) -> Importance:
    cfg = model.config
    inner = model.model
    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    layer = torch.zeros(n_layers, dtype=torch.float64)
    channel = torch.zeros(hidden, dtype=torch.float64)
    head = torch.zeros(n_layers, cfg.num_attention_heads, dtype=torch.float64)
    unit = torch.zeros(n_layers, cfg.intermediate_size, dtype=torch.float64)
    tokens = [0]
    handles = []

    def norm_hook(_m, _a, out):
        channel.add_(out.detach().abs().float().sum(dim=(0, 1)).double())

    for i, block in enumerate(inner.layers):
        def block_hook(_m, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            layer[i] += (1 - cos).double().sum()

        def o_hook(_m, args, i=i):
            x = args[0].detach().float()
            head[i] += x.reshape(*x.shape[:-1], -1, head_dim).norm(dim=-1).sum(dim=(0, 1)).double()

        def down_hook(_m, args, i=i):
            unit[i] += args[0].detach().abs().float().sum(dim=(0, 1)).double()

        handles += [block.register_forward_hook(block_hook, with_kwargs=True),
                    block.self_attn.o_proj.register_forward_pre_hook(o_hook),
                    block.mlp.down_proj.register_forward_pre_hook(down_hook),
                    block.input_layernorm.register_forward_hook(norm_hook),
                    block.post_attention_layernorm.register_forward_hook(norm_hook)]
    handles.append(inner.norm.register_forward_hook(norm_hook))
    try:
        with torch.inference_mode():
            for b0 in tqdm(range(0, len(sequences), batch), desc="importance", unit="batch", disable=not progress,
                           leave=False):
                ids = sequences[b0:b0 + batch]
                model(input_ids=ids, use_cache=False)
                tokens[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    n = max(tokens[0], 1)
    return Importance(layer / n, channel / n, head / n, unit / n)


def magnitude(model) -> Importance:
    """The data-free fallback: weight norms standing in for activations."""
    sd = model.state_dict()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads, units = [], []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        o = sd[p + "self_attn.o_proj.weight"].float()
        heads.append(o.reshape(o.shape[0], -1, head_dim).norm(dim=(0, 2)))
        units.append(sd[p + "mlp.up_proj.weight"].float().norm(dim=1) * sd[p + "mlp.down_proj.weight"].float().norm(dim=0))
    # without data every layer looks alike: prefer keeping the first and last ones
    n = cfg.num_hidden_layers
    layer = torch.tensor([float(min(i, n - 1 - i) == 0) + 1.0 / (1 + min(i, n - 1 - i)) for i in range(n)])
    return Importance(layer, sd["model.embed_tokens.weight"].float().norm(dim=0), torch.stack(heads), torch.stack(units))
