"""The teacher's next-token distributions, computed once and memory-mapped.

For every training position: the top-k log-probs (float16) and their token ids, plus the log
of the probability left outside the top k, so losses can treat the tail as one explicit bucket
instead of pretending it is zero. Keyed by teacher bytes + token sequences + k: later runs,
other losses and further epochs read the same files. Filled in chunks with a progress marker,
so an interrupted pass resumes where it stopped; the folder is renamed into place when full.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..util.atomic import write_json
from ..util.cache import cache_dir, code_version
from ..util.hashing import array_sha256


@dataclass
class TeacherTargets:
    idx: np.ndarray  # (n, seq-1, k) token ids
    logp: np.ndarray  # (n, seq-1, k) float16
    tail: np.ndarray  # (n, seq-1) float32: log(1 - sum of the top-k probabilities)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = rows.numpy()
        return (torch.from_numpy(self.idx[r].astype(np.int64)), torch.from_numpy(self.logp[r].astype(np.float32)),
                torch.from_numpy(self.tail[r]))


def cache_key(teacher_hash: str, sequences: torch.Tensor, topk: int) -> str:
    code = code_version("distill/teacher_cache", "models")
    tag = np.frombuffer(f"{teacher_hash}|k={topk}|{code}".encode(), dtype=np.uint8)
    return array_sha256(tag, sequences.numpy())[:32]


def _open(folder: Path, n: int, positions: int, k: int, vocab: int, mode: str):
    idx_dtype = np.uint16 if vocab <= 65536 else np.int32
    open_ = np.lib.format.open_memmap
    if mode == "r":
        return (np.load(folder / "idx.npy", mmap_mode="r"), np.load(folder / "logp.npy", mmap_mode="r"),
                np.load(folder / "tail.npy", mmap_mode="r"))
    if mode == "w+":
        return (open_(folder / "idx.npy", "w+", idx_dtype, (n, positions, k)),
                open_(folder / "logp.npy", "w+", np.float16, (n, positions, k)),
                open_(folder / "tail.npy", "w+", np.float32, (n, positions)))
    return tuple(open_(folder / f, "r+") for f in ("idx.npy", "logp.npy", "tail.npy"))


def teacher_targets(model, sequences: torch.Tensor, topk: int, teacher_hash: str, batch: int = 4,
                    progress: bool = True, bf16: bool = True) -> TeacherTargets:
    n, seq = sequences.shape
    vocab = model.config.vocab_size
    topk = min(topk, vocab)
    key = cache_key(teacher_hash, sequences, topk)
    final = cache_dir() / "teacher" / key
    if (final / "meta.json").exists():
        return TeacherTargets(*_open(final, n, seq - 1, topk, vocab, "r"))
    partial = final.with_name(key + ".partial")
    marker = partial / "progress.json"
    done = json.loads(marker.read_text())["done"] if marker.exists() else 0
    if done == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    arrays = _open(partial, n, seq - 1, topk, vocab, "w+" if done == 0 else "r+")
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=bf16 and model.device.type == "cpu"), \
            tqdm(total=n, initial=done, desc="teacher top-k", unit="seq", disable=not progress) as bar:
        for b0 in range(done, n, batch):
            b1 = min(b0 + batch, n)
            logits = model(input_ids=sequences[b0:b1].to(model.device), use_cache=False).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            values, ids = torch.topk(logp, topk, dim=-1)
            mass = values.exp().sum(-1).clamp(max=1.0)
            arrays[0][b0:b1] = ids.cpu().numpy()
            arrays[1][b0:b1] = values.cpu().numpy()
            arrays[2][b0:b1] = torch.log1p(-mass).clamp(min=-30.0).cpu().numpy()
            for a in arrays:
                a.flush()
            write_json(marker, {"done": b1})
            bar.update(b1 - b0)
    del arrays
    write_json(partial / "meta.json", {"key": key, "n": n, "seq": seq, "topk": topk, "teacher": teacher_hash})
    shutil.rmtree(final, ignore_errors=True)  # a leftover without meta.json is not a cache
    os.replace(partial, final)
    return TeacherTargets(*_open(final, n, seq - 1, topk, vocab, "r"))
