"""`pocketlm distill`: teacher -> importance -> pruned student -> teacher top-k -> KD -> HF folder."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import PocketError
from ..util.cache import model_content_hash
from ..util.hashing import array_sha256
from ..util.machine import compute_device
from .data import load_sequences
from .importance import measure
from .loss_spec import check_targets, parse_loss, resolve_ce_weight
from .prune import check_prunable, kept_channels, prune
from .shapes import StudentShape, TeacherDims, default_shape, predicted_sizes, validate
from .signals import OnlineTeacher, choose
from .teacher_cache import teacher_targets
from .trainer import Checkpoint, Dist, TrainConfig, train

log = logging.getLogger(__name__)
MANIFEST = "distill.json"


@dataclass
class DistillOptions:
    data: list
    tokens: int = 500_000
    seq: int = 512
    layers: int | None = None
    drop_layers: list[int] | None = None
    hidden: int | None = None
    ffn: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    fraction: float = 0.5  # of the teacher's non-embedding parameters, when no shape is given
    student: str | None = None  # start from this model instead of pruning the teacher
    prune_from: str | None = None  # prune this student of the teacher instead of the teacher (distill/stages.py)
    loss: str = "fkl"
    tail: str = "bucket"  # "sample": see distill/losses.py
    ce_weight: float | None = None  # loss = divergence + ce_weight * cross-entropy on the data; None: loss_spec's default
    hidden_weight: float = 0.0  # + hidden_weight * the final hidden state's cosine distance (losses.hidden_loss)
    targets: str = "auto"  # the teacher's signal: full | sampled | topk (signals.py); auto picks by teacher size
    topk: int = 64
    samples: int = 12  # draws per position for targets "sampled" (arXiv 2503.16870: ~12 match full KD)
    lr: float = 3e-4
    batch: int = 8
    micro_batch: int = 2
    warmup: int | None = None
    importance_tokens: int = 16384
    eval_every: int = 50
    save_every: int = 50
    bf16: bool = True
    seed: int = 0
    resume: bool = False
    force: bool = False
    progress: bool = True
    say: Callable[[str], None] | None = None  # where to tell the user what was chosen


def choose_shape(t: TeacherDims, layer_order: list[int], opts: DistillOptions) -> StudentShape:
    if opts.drop_layers is not None and opts.layers is not None:
        raise PocketError("give --layers or --drop-layers, not both")
    order, layers = layer_order, opts.layers
    if opts.drop_layers is not None:
        bad = [i for i in opts.drop_layers if not 0 <= i < t.layers]
        if bad:
            raise PocketError(f"--drop-layers {bad} are not layers of the teacher (0..{t.layers - 1})")
        order = [i for i in range(t.layers) if i not in set(opts.drop_layers)]
        layers = len(order)
    shape = default_shape(t, order, opts.fraction, layers=layers, hidden=opts.hidden, ffn=opts.ffn,
                          heads=opts.heads, kv_heads=opts.kv_heads)
    validate(t, shape)
    return shape


def describe(t: TeacherDims, shape: StudentShape, cut: str = "the teacher") -> list[str]:
    """What the student keeps of `t`, the model it is `cut` from."""
    teacher_p, student_p = t.non_embedding(), shape.non_embedding(t)
    sizes = predicted_sizes(t, shape)
    lines = [f"student: {len(shape.keep_layers)} layers ({cut}'s {list(shape.keep_layers)}), hidden {shape.hidden}, "
             f"{shape.heads} heads / {shape.kv_heads} kv, ffn {shape.ffn}",
             f"non-embedding parameters: {student_p / 1e6:.1f}M ({100 * student_p / teacher_p:.0f}% of {cut}'s "
             f"{teacher_p / 1e6:.1f}M); embeddings {t.vocab * shape.hidden / 1e6:.1f}M",
             "predicted GGUF sizes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())]
    unaligned = [n for n, v in (("hidden", shape.hidden), ("attention width", shape.heads * t.head_dim),
                                ("ffn", shape.ffn)) if v % 256]
    if unaligned:
        lines.append(f"note: {', '.join(unaligned)} not a multiple of 256: k-quants fall back to legacy types there")
    return lines


def _settings(opts: DistillOptions, teacher_hash: str, seqs, loss_targets: str) -> dict:
    """Everything besides --tokens that makes a run what it is: a finished run is continued
    (--resume with more --tokens) only under the same settings."""
    shape_options = {k: getattr(opts, k) for k in ("layers", "drop_layers", "hidden", "ffn", "heads", "kv_heads",
                                                   "fraction")}
    return {"teacher": teacher_hash, "data": seqs.fingerprint, "seq": opts.seq, "student": opts.student,
            **({"prune_from": opts.prune_from} if opts.prune_from else {}),
            "shape_options": shape_options, "loss": opts.loss, "tail": opts.tail, "targets": loss_targets,
            **({"ce_weight": opts.ce_weight} if opts.ce_weight else {}),
            **({"hidden_weight": opts.hidden_weight} if opts.hidden_weight else {}),
            "k": opts.topk if loss_targets == "topk" else opts.samples if loss_targets == "sampled" else None,
            "lr": opts.lr, "batch": opts.batch, "seed": opts.seed, "bf16": opts.bf16}


def _run_key(settings: dict, shape: StudentShape | None, seqs: torch.Tensor, cfg: TrainConfig,
             continued: str | None) -> str:
    text = json.dumps({**settings, "shape": shape.to_dict() if shape else None, "steps": cfg.steps,
                       "warmup": cfg.warmup, "continued": continued}, sort_keys=True)
    return array_sha256(np.frombuffer(text.encode(), dtype=np.uint8), seqs.numpy())[:32]


def _finished_run(out: Path, settings: dict, steps: int) -> dict:
    """The manifest of the finished run in `out` that --resume continues, after checking it can be."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        raise PocketError(f"{out} exists but holds no finished distillation run ({MANIFEST}); pass --force to "
                          "replace it") from None
    old = manifest.get("settings")
    if old is None:
        raise PocketError(f"{out} was distilled by an older pocketlm that did not record its settings: train it further "
                          f"with --student {out} -o NEW, or start over with --force")
    differ = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if differ:
        said = ", ".join(f"{k} {old.get(k)!r} (now {settings.get(k)!r})" for k in differ)
        raise PocketError(f"the finished run in {out} had other settings: {said}; continue it with the same ones, or "
                          "start over with --force")
    if steps <= manifest["steps"]:
        raise PocketError(f"{out} is already trained for {manifest['tokens']} tokens ({manifest['steps']} steps); "
                          "give a larger --tokens to continue it")
    return manifest


def _check_same_vocab(teacher, student) -> None:
    tv, sv = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if tv != sv or teacher.model.config.vocab_size != student.model.config.vocab_size:
        raise PocketError(f"the student's vocabulary ({len(sv)} tokens) differs from the teacher's ({len(tv)}): "
                          "distillation compares them token by token, so they must share one tokenizer")


def distill(teacher_source, out: str | Path, opts: DistillOptions) -> dict:
    from ..models.export_hf import save_hf
    from ..models.load import load
    from ..models.source import resolve

    out = Path(out)
    if out.exists() and not opts.force and not opts.resume:
        raise PocketError(f"{out} exists; pass --force to replace it, or --resume with a larger --tokens to train it further")
    loss, beta = parse_loss(opts.loss)
    ce_weight = resolve_ce_weight(loss, opts.ce_weight)
    opts = replace(opts, ce_weight=ce_weight)  # a number from here on, as recorded
    # before loading anything, so a bad pair fails in a second
    check_targets(loss, opts.tail, opts.targets, ce_weight, opts.hidden_weight)
    if opts.hidden_weight and opts.student:
        raise PocketError("--hidden-weight compares the student's hidden channels with the teacher's it was cut from: "
                          "it needs a student pruned by distill, not --student")
    dist = Dist.from_env()

    def say(line: str) -> None:
        if dist.main:
            (opts.say or log.info)(line)
    t_start = time.perf_counter()
    src = resolve(teacher_source)
    teacher = load(src)
    seqs = load_sequences(teacher.tokenizer, opts.data, opts.seq, teacher.add_bos, max_train_tokens=opts.tokens or None)
    steps = max(0, math.ceil(opts.tokens / (opts.batch * (opts.seq - 1))))  # 0: prune only
    kind = choose(opts.targets, sum(p.numel() for p in teacher.model.parameters()))
    check_targets(loss, opts.tail, kind, ce_weight, opts.hidden_weight)  # auto has become full or sampled
    teacher_hash = model_content_hash(src)
    settings = _settings(opts, teacher_hash, seqs, kind)
    finished = _finished_run(out, settings, steps) if out.exists() and opts.resume and not opts.force else None
    cfg = TrainConfig(loss=loss, beta=beta, tail=opts.tail, ce_weight=ce_weight, hidden_weight=opts.hidden_weight,
                      steps=steps, batch=opts.batch,
                      micro_batch=opts.micro_batch, lr=opts.lr,
                      warmup=opts.warmup if opts.warmup is not None else max(1, steps // 20),
                      eval_every=opts.eval_every, save_every=opts.save_every, bf16=opts.bf16, seed=opts.seed,
                      rewarm_from=finished["steps"] if finished else 0)

    shape = None
    channels = None  # the teacher's hidden channels the student kept, in its order
    if finished:
        channels = finished.get("channels")
        student = load(out)
        shape = StudentShape.from_dict(finished["shape"]) if finished["shape"] else None
        say(f"continuing {out}: {finished['tokens']} tokens done, training to {steps * cfg.batch * (opts.seq - 1)}")
    elif opts.student:
        student = load(opts.student)
        _check_same_vocab(teacher, student)
        say(f"student: {opts.student} as given (no pruning)")
    else:
        # the model cut: the teacher, or (iterative pruning) a student of it healed earlier
        base, base_channels = teacher, None
        if opts.prune_from:
            base = load(opts.prune_from)
            _check_same_vocab(teacher, base)
            try:
                base_channels = json.loads((Path(opts.prune_from) / MANIFEST).read_text()).get("channels")
            except (OSError, ValueError):
                base_channels = None
        check_prunable(base.model.config)  # before the importance pass, not after it
        n_imp = max(1, min(len(seqs.train), opts.importance_tokens // opts.seq))
        importance = measure(base.model, seqs.train[:n_imp], progress=opts.progress and dist.main)
        tb = TeacherDims.of(base.model.config)
        shape = choose_shape(tb, importance.layer_order(), opts)
        for line in describe(tb, shape, "the teacher" if base is teacher else f"the pruned model {opts.prune_from}"):
            say(line)
        student = prune(base, shape, importance)
        channels = kept_channels(importance, shape.hidden)
        if base is not teacher:  # channels of a pruned model: map them back to the teacher's
            channels = [base_channels[c] for c in channels] if base_channels else None
        del base
    if opts.hidden_weight and channels is None:
        raise PocketError("--hidden-weight needs to know which teacher channels the student kept; this student's "
                          "manifest does not say (made by an older pocketlm, or by --student)")
    if loss != "ce":
        say(f"teacher signal: {kind}" + (" (the whole vocabulary, computed beside the student)" if kind == "full" else
                                         f" ({opts.samples} draws per position, cached)" if kind == "sampled" else
                                         f" (top {opts.topk} per position, cached)"))

    continued = finished.get("run_key") if finished else None
    run_key = _run_key(settings, shape, seqs.train, cfg, continued)
    ckpt = Checkpoint(out.with_name(out.name + ".ckpt"), run_key)
    # the teacher pass is the other big compute of a run: it goes where training goes
    teacher.model.to(compute_device(dist.local_rank), torch.bfloat16 if opts.bf16 else torch.float32)

    def targets(rows, hidden: bool = False):
        if kind == "full":  # hidden states only where the hidden-state loss trains on them
            return OnlineTeacher(teacher.model, torch.tensor(channels) if hidden and opts.hidden_weight else None)
        if dist.local_rank != 0:
            dist.barrier()  # local rank 0 fills the shared cache; the others then read it
        k, form = (opts.samples, "sampled") if kind == "sampled" else (opts.topk, "topk")
        result = teacher_targets(teacher.model, rows, k, teacher_hash, progress=opts.progress and dist.main,
                                 bf16=False, form=form, seed=opts.seed)
        if dist.local_rank == 0:
            dist.barrier()
        return result

    train_targets = None if loss == "ce" or steps == 0 else targets(seqs.train, hidden=True)
    held_targets = targets(seqs.held_out)  # the held-out KLD is reported under every loss, ce included
    if kind != "full":
        del teacher.model
    history = train(student.model, seqs.train, train_targets, seqs.held_out, held_targets, cfg, ckpt, opts.resume,
                    opts.progress, continue_from=(finished["steps"], finished["history"]) if finished else None)
    manifest = {"teacher": str(src.path), "teacher_sha256": teacher_hash, "shape": shape.to_dict() if shape else None,
                "student_init": opts.student, "loss": opts.loss, "tail": opts.tail, "targets": kind,
                "ce_weight": opts.ce_weight, "hidden_weight": opts.hidden_weight, "channels": channels,
                "topk": opts.topk if kind == "topk" else None, "samples": opts.samples if kind == "sampled" else None,
                "tokens": steps * cfg.batch * (opts.seq - 1),
                "train_tokens_available": seqs.train_tokens, "documents": seqs.documents, "seq": opts.seq,
                "steps": steps, "lr": opts.lr, "batch": opts.batch, "history": history,
                "seconds": time.perf_counter() - t_start + (finished["seconds"] if finished else 0.0),
                "continued_from_tokens": (finished.get("continued_from_tokens", []) + [finished["tokens"]]) if finished else [],
                "settings": settings, "run_key": run_key}
    if dist.main:
        student.model.to("cpu").float()
        save_hf(student, out, "f32", extra_files={MANIFEST: json.dumps(manifest, indent=1)})
        ckpt.remove()
    dist.barrier()
    return manifest
