"""Torch forward passes for HF folders (and for anything transformers loads)."""
from __future__ import annotations

import numpy as np

from ..models.load import LoadedModel


class TorchModel:
    def __init__(self, loaded: LoadedModel, *, dtype: str = "float32"):
        import torch

        from ..util.machine import compute_device

        self.loaded = loaded
        self.dtype = getattr(torch, dtype)
        self.device = compute_device()
        self.model = loaded.model.to(self.device, self.dtype)
        self.tokenizer = loaded.tokenizer

    @property
    def n_vocab(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def add_bos(self) -> bool:
        return self.loaded.add_bos

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def logits(self, tokens: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids).logits[0]
        return out.float().cpu().numpy()
