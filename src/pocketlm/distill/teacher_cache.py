"""The teacher's next-token distributions, computed once and memory-mapped.

Two cached forms (signals.py says when each is used):
- top-k: for every training position the top-k log-probs (float16) and their token ids, plus
  the log of the probability left outside the top k, so losses can treat the tail as one
  explicit bucket instead of pretending it is zero;
- sampled: K token ids drawn from the teacher's full distribution (with replacement) and the
  teacher's log-prob of each, an unbiased sparse stand-in for the whole distribution.
Keyed by teacher bytes + token sequences + the form and its size (+ the draws' seed) + code:
later runs, other losses and further epochs read the same files. Filled in chunks with a
progress marker, so an interrupted pass resumes where it stopped (the draws of a chunk depend
only on the seed and the chunk, so a resumed pass draws what an uninterrupted one would); the
folder is renamed into place when full.
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
from .signals import Sampled, TopK


@dataclass
class TeacherTargets:
    idx: np.ndarray  # (n, seq-1, k) token ids
    logp: np.ndarray  # (n, seq-1, k) float16
    tail: np.ndarray  # (n, seq-1) float32: log(1 - sum of the top-k probabilities)

    def batch(self, rows: torch.Tensor, ids: torch.Tensor | None = None) -> TopK:
        r = rows.numpy()
        return TopK(torch.from_numpy(self.idx[r].astype(np.int64)), torch.from_numpy(self.logp[r].astype(np.float32)),
                    torch.from_numpy(self.tail[r]))


@dataclass
class SampledTargets:
    idx: np.ndarray  # (n, seq-1, K) token ids drawn from the teacher
    logp: np.ndarray  # (n, seq-1, K) float16: the teacher's log-prob of each draw

    def batch(self, rows: torch.Tensor, ids: torch.Tensor | None = None) -> Sampled:
        r = rows.numpy()
        return Sampled(torch.from_numpy(self.idx[r].astype(np.int64)), torch.from_numpy(self.logp[r].astype(np.float32)))


def cache_key(teacher_hash: str, sequences: torch.Tensor, topk: int, form: str = "topk", seed: int = 0) -> str:
    code = code_version("distill/teacher_cache", "models")
    what = f"k={topk}" if form == "topk" else f"sampled={topk}|seed={seed}"
    tag = np.frombuffer(f"{teacher_hash}|{what}|{code}".encode(), dtype=np.uint8)
    return array_sha256(tag, sequences.numpy())[:32]


def _specs(form: str, n: int, positions: int, k: int, vocab: int) -> dict:
    idx_dtype = np.uint16 if vocab <= 65536 else np.int32
    specs: dict[str, tuple] = {"idx": (idx_dtype, (n, positions, k)), "logp": (np.float16, (n, positions, k))}
    if form == "topk":
        specs["tail"] = (np.float32, (n, positions))
    return specs


def _open(folder: Path, specs: dict, mode: str) -> dict:
    if mode == "r":
        return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in specs}
    if mode == "w+":
        return {name: np.lib.format.open_memmap(folder / f"{name}.npy", "w+", dtype, shape)
                for name, (dtype, shape) in specs.items()}
    return {name: np.lib.format.open_memmap(folder / f"{name}.npy", "r+") for name in specs}


def _topk_rows(logp: torch.Tensor, k: int, generator) -> dict:
    values, ids = torch.topk(logp, k, dim=-1)
    mass = values.exp().sum(-1).clamp(max=1.0)
    return {"idx": ids, "logp": values, "tail": torch.log1p(-mass).clamp(min=-30.0)}


def _sampled_rows(logp: torch.Tensor, k: int, generator) -> dict:
    flat = logp.reshape(-1, logp.shape[-1])
    ids = torch.multinomial(flat.exp(), k, replacement=True, generator=generator)
    return {"idx": ids.reshape(*logp.shape[:-1], k), "logp": torch.gather(flat, 1, ids).reshape(*logp.shape[:-1], k)}


def teacher_targets(model, sequences: torch.Tensor, topk: int, teacher_hash: str, batch: int = 4,
                    progress: bool = True, bf16: bool = True, form: str = "topk",
                    seed: int = 0) -> TeacherTargets | SampledTargets:
    """form "topk": the top `topk` per position; form "sampled": `topk` draws per position."""
    n, seq = sequences.shape
    vocab = model.config.vocab_size
    if form == "topk":
        topk = min(topk, vocab)
    specs = _specs(form, n, seq - 1, topk, vocab)
    make = TeacherTargets if form == "topk" else SampledTargets
    rows_of = _topk_rows if form == "topk" else _sampled_rows
    key = cache_key(teacher_hash, sequences, topk, form, seed)
    final = cache_dir() / "teacher" / key
    if (final / "meta.json").exists():
        return make(**_open(final, specs, "r"))
    partial = final.with_name(key + ".partial")
    marker = partial / "progress.json"
    done = json.loads(marker.read_text())["done"] if marker.exists() else 0
    if done == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    arrays = _open(partial, specs, "w+" if done == 0 else "r+")
    dtype = torch.bfloat16 if bf16 else torch.float32
    desc = "teacher top-k" if form == "topk" else "teacher samples"
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=bf16 and model.device.type == "cpu"), \
            tqdm(total=n, initial=done, desc=desc, unit="seq", disable=not progress) as bar:
        for b0 in range(done, n, batch):
            b1 = min(b0 + batch, n)
            logits = model(input_ids=sequences[b0:b1].to(model.device), use_cache=False).logits[:, :-1].float()
            generator = torch.Generator(device=logits.device).manual_seed(seed * 1_000_003 + b0)
            for name, values in rows_of(torch.log_softmax(logits, dim=-1), topk, generator).items():
                arrays[name][b0:b1] = values.cpu().numpy()
                arrays[name].flush()
            write_json(marker, {"done": b1})
            bar.update(b1 - b0)
    del arrays
    write_json(partial / "meta.json", {"key": key, "n": n, "seq": seq, "form": form, "k": topk, "teacher": teacher_hash})
    shutil.rmtree(final, ignore_errors=True)  # a leftover without meta.json is not a cache
    os.replace(partial, final)
    return make(**_open(final, specs, "r"))
