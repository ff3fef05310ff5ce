"""Training text -> fixed-length token sequences, with a held-out slice for evaluation."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PocketError
from ..eval.windows import make_windows
from ..rag.loaders import find_documents, read_document
from ..util.hashing import array_sha256


@dataclass
class Sequences:
    train: torch.Tensor  # (n, seq) int64; position t predicts token t+1
    held_out: torch.Tensor
    documents: int
    fingerprint: str = ""  # of every token of the data, before --tokens picks the training windows

    @property
    def train_tokens(self) -> int:
        return int(self.train.shape[0] * (self.train.shape[1] - 1))


def load_sequences(tokenizer, paths, seq: int, add_bos: bool, max_train_tokens: int | None = None,
                   held_out_fraction: float = 0.05, max_held_out: int = 32) -> Sequences:
    """Documents (files or folders, the RAG loaders) joined with EOS between them, cut into
    sequences of `seq` tokens. The last sequences are held out (never trained on)."""
    files = find_documents(paths)
    if not files:
        raise PocketError(f"no usable documents in {', '.join(map(str, paths))}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for f in files:
        text = read_document(f).strip()
        if text:
            ids += tokenizer(text, add_special_tokens=False).input_ids
            if eos is not None:
                ids.append(eos)
    per = seq - 1 if add_bos else seq
    if len(ids) < per:
        raise PocketError(f"the data has {len(ids)} tokens, fewer than one sequence of {seq}; give more text or a smaller --seq")
    windows = make_windows(ids, seq, tokenizer.bos_token_id if add_bos else None).inputs
    n = len(windows)
    n_held = 0 if n < 2 else max(1, min(max_held_out, int(n * held_out_fraction)))
    train, held = windows[: n - n_held], windows[n - n_held:]
    if max_train_tokens:
        k = max(1, -(-max_train_tokens // (seq - 1)))
        if k < len(train):
            # evenly spread over all the training windows, not the first k: documents are joined in
            # name order, so the first k were the first file alone (the bundled general text's c4.txt
            # before its Wikipedia: a 100k-token run saw 80% web text). Measured on an off-grid Q2_K
            # file, qad at 100k tokens: 0.82x gptq's KLD on held-out Wikipedia from the first windows,
            # 0.76x trained on the Wikipedia file alone (bench/results/qad.md)
            train = train[(np.arange(k) * len(train)) // k]
    if not len(held):
        held = train  # a single sequence: evaluation can only look at what it trains on
    fingerprint = array_sha256(np.asarray(ids, dtype=np.int64), np.asarray([seq, int(add_bos)]))[:32]
    return Sequences(torch.from_numpy(np.ascontiguousarray(train)), torch.from_numpy(np.ascontiguousarray(held)), len(files),
                     fingerprint)
