"""A transformers model with no weights in memory, whose parts are loaded when their turn comes.

Calibration (imatrix, gptq) needs the model's own layer code (attention, rotary embeddings,
masks) but only one decoder layer at a time. The model is built on the meta device (accelerate's
init_empty_weights keeps buffers such as rotary frequencies real), each decoder layer is read
from the safetensors when it is worked on and dropped after, and the token embedding holds only
the rows of the calibration tokens. Peak memory is one layer plus the calibration activations,
whatever the model's size; the arithmetic is the same as on the whole model (float32), so the
files made from it are byte-identical.
"""
from __future__ import annotations

import torch

from ..errors import PocketError
from .facts import hf_config
from .source import ModelSource, resolve
from .tensors import SafetensorsSource

EMBED_BLOCK_ROWS = 4096  # embedding rows read at once when gathering the calibration tokens' rows


class LayerStream:
    def __init__(self, source, device: str = "cpu"):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from .load import hf_folder, load_tokenizer

        src = resolve(source)
        folder = hf_folder(src)  # a GGUF is read through pocketlm's cached HF copy of it
        self.tensors = SafetensorsSource(ModelSource("hf", folder, src.name))
        self.facts = self.tensors.facts
        self.tokenizer, self.add_bos = load_tokenizer(src)
        self.device = torch.device(device)
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(hf_config(folder), dtype=torch.float32)
        self.model.eval()
        for module in self.model.modules():  # rotary frequencies, embedding scales: real already
            for name, buf in module._buffers.items():
                if buf is not None and buf.device.type != "meta":
                    module._buffers[name] = buf.to(self.device)
        self.text_config = getattr(self.model.config, "text_config", None) or self.model.config
        inner = getattr(self.model, "model", self.model)
        self.inner = getattr(inner, "language_model", inner)
        self.layers = self.inner.layers
        self._names = {id(m): n for n, m in self.model.named_modules()}
        self._where = set(self.tensors.hf_names)
        self._hf = {self.facts.gguf_name(n): n for n in self.tensors.hf_names}

    def hf_name_of(self, gguf_name: str) -> str:
        """The checkpoint's name of a GGUF tensor (a tied output projection is the embedding)."""
        if gguf_name == "output.weight" and gguf_name not in self._hf:
            gguf_name = "token_embd.weight"
        return self._hf[gguf_name]

    def _read(self, name: str) -> torch.Tensor:
        return self.tensors.hf_tensor(self._stored_name(name)).float()

    def _stored_name(self, name: str) -> str:
        """Multimodal wrappers name the text model's tensors model.language_model.*; text-only
        checkpoints of the same model say model.*."""
        if name not in self._where and name.startswith("model.language_model."):
            return name.replace("model.language_model.", "model.", 1)
        return name

    def load(self, module: torch.nn.Module, given: dict[str, torch.Tensor] | None = None) -> None:
        """Give a module of the skeleton its weights (float32, on the device): those in `given`
        (by name within the module, e.g. a layer's quantized-and-decoded weights), the rest
        from the checkpoint."""
        prefix = self._names[id(module)]
        given = given or {}
        names = list(module.state_dict())
        unknown = set(given) - set(names)
        if unknown:
            raise ValueError(f"{prefix} has no {', '.join(sorted(unknown))}")
        state = {k: (given[k] if k in given else self._read(f"{prefix}.{k}")).to(self.device) for k in names}
        module.load_state_dict(state, strict=True, assign=True)

    @staticmethod
    def unload(module: torch.nn.Module) -> None:
        module.to("meta")

    def embed_only(self, windows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Load the token embedding's rows for these token ids only; returns the windows
        renumbered into that small table (the model computes the same hidden states)."""
        emb = self.model.get_input_embeddings()
        name = self._stored_name(f"{self._names[id(emb)]}.weight")
        ids = torch.cat([w.reshape(-1) for w in windows])
        uniq, inverse = torch.unique(ids, return_inverse=True)
        vocab = self.tensors.entries["token_embd.weight"].shape[0]
        if int(uniq.max()) >= vocab:
            raise PocketError(f"token id {int(uniq.max())} is outside the embedding's {vocab} rows")
        rows = torch.empty((len(uniq), self.facts.hidden), dtype=torch.float32)
        for r0 in range(0, vocab, EMBED_BLOCK_ROWS):
            sel = (uniq >= r0) & (uniq < r0 + EMBED_BLOCK_ROWS)
            if bool(sel.any()):
                block = self.tensors.hf_tensor(name, slice(r0, min(r0 + EMBED_BLOCK_ROWS, vocab))).float()
                rows[sel] = block[uniq[sel] - r0]
        emb.weight = torch.nn.Parameter(rows.to(self.device), requires_grad=False)
        parts = inverse.split([w.numel() for w in windows])
        return [p.reshape(w.shape).to(self.device) for p, w in zip(parts, windows)]
