"""Width pruning of Llama-family models by weight-magnitude importance, without healing.

A first, data-free cut: residual channels ranked by the norm of their embedding column,
attention heads by the norm of their slice of o_proj, MLP units by |up| * |down|. GQA groups
that cannot be kept whole become plain multi-head attention (each kept query head gets its own
copy of its group's key/value rows), which computes exactly what the grouped layout did and
lets the head count be a multiple of 4 so that every Linear input is 256-aligned.
"""
from __future__ import annotations

import torch

from ..errors import PocketError
from ..models.load import LoadedModel


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


def prune_llama_width(loaded: LoadedModel, hidden: int, heads: int, ffn: int | None = None) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    teacher = loaded.model
    cfg = teacher.config
    if cfg.model_type not in ("llama", "mistral"):
        raise PocketError(f"width pruning supports Llama/Mistral models, not {cfg.model_type}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    ffn = ffn or cfg.intermediate_size
    if hidden > cfg.hidden_size or heads > cfg.num_attention_heads or ffn > cfg.intermediate_size:
        raise PocketError("pruned sizes must not exceed the teacher's")
    sd = teacher.state_dict()
    keep_c = _top(sd["model.embed_tokens.weight"].float().norm(dim=0), hidden)
    new_cfg = LlamaConfig(**{**cfg.to_dict(), "hidden_size": hidden, "num_attention_heads": heads,
                             "num_key_value_heads": heads, "head_dim": head_dim, "intermediate_size": ffn})
    new_cfg.architectures = ["LlamaForCausalLM"]
    student = LlamaForCausalLM(new_cfg).eval()
    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:, keep_c],
           "model.norm.weight": sd["model.norm.weight"][keep_c]}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        o = sd[p + "self_attn.o_proj.weight"]
        head_score = o.float().reshape(o.shape[0], -1, head_dim).norm(dim=(0, 2))
        keep_h = _top(head_score, heads)
        q_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep_h.tolist()])
        kv_rows = torch.cat([torch.arange((h // group) * head_dim, (h // group + 1) * head_dim) for h in keep_h.tolist()])
        up, down = sd[p + "mlp.up_proj.weight"], sd[p + "mlp.down_proj.weight"]
        keep_f = _top(up.float().norm(dim=1) * down.float().norm(dim=0), ffn)
        out.update({
            p + "input_layernorm.weight": sd[p + "input_layernorm.weight"][keep_c],
            p + "post_attention_layernorm.weight": sd[p + "post_attention_layernorm.weight"][keep_c],
            p + "self_attn.q_proj.weight": sd[p + "self_attn.q_proj.weight"][q_rows][:, keep_c],
            p + "self_attn.k_proj.weight": sd[p + "self_attn.k_proj.weight"][kv_rows][:, keep_c],
            p + "self_attn.v_proj.weight": sd[p + "self_attn.v_proj.weight"][kv_rows][:, keep_c],
            p + "self_attn.o_proj.weight": o[keep_c][:, q_rows],
            p + "mlp.gate_proj.weight": sd[p + "mlp.gate_proj.weight"][keep_f][:, keep_c],
            p + "mlp.up_proj.weight": up[keep_f][:, keep_c],
            p + "mlp.down_proj.weight": down[keep_c][:, keep_f],
        })
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:, keep_c]
    missing, unexpected = student.load_state_dict(out, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise PocketError(f"pruning produced mismatched weights: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    return LoadedModel(loaded.source, student, loaded.tokenizer, loaded.gguf_tokenizer, dict(loaded.meta))
