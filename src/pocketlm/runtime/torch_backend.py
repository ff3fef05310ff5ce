"""Torch forward passes for HF folders (and for anything transformers loads)."""
from __future__ import annotations

import numpy as np

from ..models.load import LoadedModel


class TorchModel:
    def __init__(self, loaded: LoadedModel, *, dtype: str = "float32"):
        import torch

        self.loaded = loaded
        self.dtype = getattr(torch, dtype)
        self.model = loaded.model.to(self.dtype)
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
            ids = torch.tensor([tokens], dtype=torch.long)
            out = self.model(input_ids=ids).logits[0]
        return out.float().numpy()
