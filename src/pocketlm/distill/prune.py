"""Cut a Llama-family teacher down to a student shape, keeping what importance ranks highest.

Layers, residual channels, attention heads (or whole key/value groups) and MLP units are
selected by an Importance (activation-based from importance.py, or weight magnitudes without
data). When the kept heads cannot form whole GQA groups the student becomes plain multi-head
attention: each kept query head gets its own copy of its group's key/value rows, which
computes exactly what the grouped layout did.
"""
from __future__ import annotations

import torch

from ..errors import PocketError
from ..models.load import LoadedModel
from .importance import Importance, magnitude
from .shapes import StudentShape, TeacherDims, validate

PRUNABLE = ("llama", "mistral")


def check_prunable(config) -> None:
    if config.model_type not in PRUNABLE:
        raise PocketError(f"pruning supports {'/'.join(PRUNABLE)} models, not {config.model_type}")
    if getattr(config, "attention_bias", False):
        raise PocketError("pruning models with attention biases is not supported")


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist())


def _rows(units: list[int], size: int) -> torch.Tensor:
    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])


def _heads_and_groups(score: torch.Tensor, t: TeacherDims, s: StudentShape) -> tuple[list[int], list[int]]:
    """(kept query heads, the teacher group each student key/value head copies)."""
    group = t.heads // t.kv_heads
    if s.kv_heads == s.heads:
        heads = _top(score, s.heads)
        return heads, [h // group for h in heads]
    groups = _top(score.reshape(t.kv_heads, group).sum(dim=1), s.kv_heads)
    per = s.heads // s.kv_heads
    heads = [g * group + j for g in groups for j in _top(score[g * group:(g + 1) * group], per)]
    return heads, groups


def kept_channels(importance: Importance, hidden: int) -> list[int]:
    """The hidden channels a cut to `hidden` keeps, in the student's order."""
    return _top(importance.channel, hidden)


def prune(loaded: LoadedModel, shape: StudentShape, importance: Importance | None = None) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    teacher = loaded.model
    cfg = teacher.config
    check_prunable(cfg)
    t = TeacherDims.of(cfg)
    validate(t, shape)
    imp = importance or magnitude(teacher)
    sd = teacher.state_dict()
    keep_c = torch.tensor(kept_channels(imp, shape.hidden))
    new_cfg = LlamaConfig(**{**cfg.to_dict(), "hidden_size": shape.hidden, "num_attention_heads": shape.heads,
                             "num_key_value_heads": shape.kv_heads, "head_dim": t.head_dim,
                             "intermediate_size": shape.ffn, "num_hidden_layers": len(shape.keep_layers)})
    new_cfg.architectures = ["LlamaForCausalLM"]
    student = LlamaForCausalLM(new_cfg).eval()
    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:, keep_c],
           "model.norm.weight": sd["model.norm.weight"][keep_c]}
    for new_i, i in enumerate(shape.keep_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{new_i}."
        heads, kv_units = _heads_and_groups(imp.head[i], t, shape)
        q_rows, kv_rows = _rows(heads, t.head_dim), _rows(kv_units, t.head_dim)
        keep_f = torch.tensor(_top(imp.unit[i], shape.ffn))
        out.update({
            q + "input_layernorm.weight": sd[p + "input_layernorm.weight"][keep_c],
            q + "post_attention_layernorm.weight": sd[p + "post_attention_layernorm.weight"][keep_c],
            q + "self_attn.q_proj.weight": sd[p + "self_attn.q_proj.weight"][q_rows][:, keep_c],
            q + "self_attn.k_proj.weight": sd[p + "self_attn.k_proj.weight"][kv_rows][:, keep_c],
            q + "self_attn.v_proj.weight": sd[p + "self_attn.v_proj.weight"][kv_rows][:, keep_c],
            q + "self_attn.o_proj.weight": sd[p + "self_attn.o_proj.weight"][keep_c][:, q_rows],
            q + "mlp.gate_proj.weight": sd[p + "mlp.gate_proj.weight"][keep_f][:, keep_c],
            q + "mlp.up_proj.weight": sd[p + "mlp.up_proj.weight"][keep_f][:, keep_c],
            q + "mlp.down_proj.weight": sd[p + "mlp.down_proj.weight"][keep_c][:, keep_f],
        })
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:, keep_c]
    missing, unexpected = student.load_state_dict({k: v.clone() for k, v in out.items()}, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise PocketError(f"pruning produced mismatched weights: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    return LoadedModel(loaded.source, student, loaded.tokenizer, loaded.gguf_tokenizer, dict(loaded.meta))


def prune_llama_width(loaded: LoadedModel, hidden: int, heads: int, ffn: int | None = None) -> LoadedModel:
    """Data-free width cut keeping every layer (used for the quantization benchmark's model)."""
    t = TeacherDims.of(loaded.model.config)
    if hidden > t.hidden or heads > t.heads or (ffn or t.ffn) > t.ffn:
        raise PocketError("pruned sizes must not exceed the teacher's")
    shape = StudentShape(tuple(range(t.layers)), hidden, heads, heads, ffn or t.ffn)
    return prune(loaded, shape)
