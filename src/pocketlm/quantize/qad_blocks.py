"""qad's first phase: each decoder layer trained alone to reproduce the original layer.

EfficientQAT's block-wise pass (Block-AP): layer i of the quantized student is fed what the
student's own earlier (already trained) layers produce, and trained (weights, scales, offsets:
whatever its FakeQuants train) until its output matches what the original layer i gives on
the original's inputs, by relative mean squared error. It is cheap (one layer forward and
backward per token, no vocabulary projection, no second model beside it) and it repairs each
layer's error where it arises, before the end-to-end phase tunes the whole against the logits.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from .calibrate import _capture_layer_inputs, _decoder_layers, layer_output


def _plain(value):
    """Captured inputs come from inference mode; autograd cannot save those for backward."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def reconstruct_blocks(student, teacher, windows: list[torch.Tensor], lr: float, epochs: int,
                       progress: bool = True) -> list[float]:
    """Train `student`'s decoder layers one by one against `teacher`'s; returns each layer's
    relative error after training (sum of squared differences / sum of squares of the target)."""
    with torch.no_grad():
        s_hidden, s_kwargs = _capture_layer_inputs(student, windows)
        t_hidden, t_kwargs = _capture_layer_inputs(teacher, windows)
    s_hidden, t_hidden = _plain(s_hidden), _plain(t_hidden)
    s_kwargs, t_kwargs = _plain(s_kwargs), _plain(t_kwargs)
    _, s_layers = _decoder_layers(student)
    _, t_layers = _decoder_layers(teacher)
    errors = []
    for i in tqdm(range(len(s_layers)), desc="qad: layer by layer", unit="layer", disable=not progress):
        layer = s_layers[i]
        with torch.no_grad():
            targets = [layer_output(t_layers[i], h, t_kwargs[i]) for h in t_hidden]
        scale = [float((y * y).mean()) or 1.0 for y in targets]
        params = [p for p in layer.parameters() if p.requires_grad]
        if params:
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(epochs):
                for h, y, sc in zip(s_hidden, targets, scale):
                    loss = ((layer_output(layer, h, s_kwargs[i]) - y) ** 2).mean() / sc
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        with torch.no_grad():
            s_hidden = [layer_output(layer, h, s_kwargs[i]) for h in s_hidden]
            num = sum(float(((o - y) ** 2).sum()) for o, y in zip(s_hidden, targets))
            errors.append(num / max(sum(float((y * y).sum()) for y in targets), 1e-30))
        t_hidden = targets
    return errors
