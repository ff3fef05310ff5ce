"""`quantize --method qad`: the gptq file, trained against the original model's logits in the
format it ships in, and written back as the same GGUF with new blocks.

The student is the teacher with every quantized decoder matrix replaced by a FakeQuant of the
start file's blocks (fakequant.py: decodes exactly as llama.cpp does) and the embedding/output
tables set to what the file decodes to, so it is the deployed model, up to arithmetic order.
It trains with forward KL over the whole vocabulary (Minitron, arXiv 2407.14679: the best
healing loss), the teacher computed beside it, through distill's loop (trainer.py: resumable,
Ctrl-C keeps a checkpoint). The output differs from the start file only in the trained
tensors' bytes, and each is read back and compared with the trained values before the file is
kept.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..errors import PocketError
from ..models.hf_arch import deinterleave_rotary_rows
from ..models.source import resolve
from ..models.tensors import GGUFSource
from ..util.atomic import atomic_path, write_json
from ..util.cache import model_content_hash
from .fakequant import FakeQuant, QuantLinear
from .formats import REGISTRY
from .formats import get as get_format
from .qad_options import CODES, QadOptions, layer_phase_tokens, learning_rate

log = logging.getLogger(__name__)


def _gguf(path: Path) -> GGUFSource:
    return GGUFSource(resolve(path))


def _trainable(reader_types: dict[str, str], name: str) -> bool:
    return name.startswith("blk.") and reader_types.get(name, "F32") in REGISTRY


# A norm's weight moves by NORM_RATE * s of its own multiplier per unit of s: relative units,
# like the block scales' (fakequant.py), so the one learning rate suits both (lr 0.02 is then
# at most ~0.2% of the multiplier per update, about what a Q4_0 block scale moves).
NORM_RATE = 0.1


class _RelativeNorm(torch.nn.Module):
    """A parametrization of a norm's weight w0 as w0 + NORM_RATE * s * (w0 + offset): exactly
    w0 at s = 0 (the start file), each channel's multiplier moved in proportion to itself."""

    def __init__(self, w0: torch.Tensor, offset: float):
        super().__init__()
        self.register_buffer("w0", w0.detach().float().clone())
        self.register_buffer("m0", self.w0 + offset)
        self.s = torch.nn.Parameter(torch.zeros_like(self.w0))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.w0 + NORM_RATE * self.s * self.m0


class TrainedNorm:
    """A float32 norm of the file that trains beside the quantized matrices.

    Norms scale each input channel of the matrices after them, a freedom no block scale has
    (those are per row); the file stores them in float32, so they cost no bytes and are exact.
    """

    def __init__(self, module: torch.nn.Module, offset: float):
        from torch.nn.utils import parametrize

        self.module, self.offset = module, offset
        parametrize.register_parametrization(module, "weight", _RelativeNorm(module.weight, offset), unsafe=True)
        module.parametrizations.weight.original.requires_grad_(False)

    def stored(self) -> np.ndarray:
        """What the file holds: the value the student multiplies by, computed as the model computes it."""
        with torch.no_grad():
            w = self.module.weight.detach().float().cpu()
            return (w + self.offset if self.offset else w).numpy().astype(np.float32)


def _norms(student, ts: GGUFSource, types: dict[str, str]) -> dict[str, TrainedNorm]:
    """Every 1-D float32 weight of the file the student has a module for (the norms)."""
    found = {}
    for name, module in list(student.named_modules()):
        w = getattr(module, "weight", None)
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or not isinstance(w, torch.nn.Parameter) or w.ndim != 1:
            continue
        gname = ts.facts.gguf_name(name + ".weight")
        if gname is not None and types.get(gname) == "F32" and len(ts.entries[gname].shape) == 1:
            found[gname] = TrainedNorm(module, ts.facts.stored_offset(name + ".weight"))
    return found


def build_student(teacher_model, start_gguf: Path, free_codes: bool = True, norms: bool = False,
                  sub_codes: bool = False):
    """(student model, {GGUF name: FakeQuant}, {GGUF name: TrainedNorm}): the teacher's code and
    float parts, the start file's quantized tables, every quantized decoder matrix as a
    trainable FakeQuant (with `sub_codes`, the k-quants' sub-block codes trainable too), and with
    `norms` the norms trainable too."""
    ts = _gguf(start_gguf)
    facts = ts.facts
    types = {n: e.type for n, e in ts.entries.items()}
    student = copy.deepcopy(teacher_model).float()
    for p in student.parameters():
        p.requires_grad_(False)
    trained: dict[str, FakeQuant] = {}
    for name, module in list(student.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        gname = facts.gguf_name(name + ".weight")
        if gname is None or not _trainable(types, gname):
            continue
        fmt = get_format(types[gname])
        rows = ts.entries[gname].shape[0]
        heads = facts.permuted_heads(gname)
        perm = deinterleave_rotary_rows(np.arange(rows), heads) if heads else None
        fq = FakeQuant(fmt, ts.raw(gname), perm, free_codes, sub_codes)
        if tuple(fq.shape) != tuple(module.weight.shape):
            raise PocketError(f"{start_gguf}: {gname} is {fq.shape}, the model's {name} is {tuple(module.weight.shape)}")
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent), child, QuantLinear(fq, module.bias))
        trained[gname] = fq
    if not trained:
        raise PocketError(f"{start_gguf} has no quantized decoder tensors to train")
    # the tables the file decodes to, not the float ones: the student must be the deployed model
    with torch.no_grad():
        emb = student.get_input_embeddings()
        emb.weight.copy_(torch.from_numpy(ts.values("token_embd.weight")))
        if "output.weight" in ts.entries:
            student.get_output_embeddings().weight.copy_(torch.from_numpy(ts.values("output.weight")))
    return student, trained, (_norms(student, ts, types) if norms else {})


def write_trained(start_gguf: Path, out: Path, trained: dict[str, FakeQuant],
                  norms: dict[str, TrainedNorm] | None = None) -> float:
    """The start file with the trained tensors' blocks (and trained norms) replaced, everything
    else byte for byte, read back: returns max |file's decoded value - trained value| over the
    trained tensors, and refuses to keep a file where it is not 0."""
    from ..models.export_gguf import metadata_writer
    from ..models.gguf_stream import StreamingGGUF

    ts = _gguf(start_gguf)
    out = Path(out)
    with atomic_path(out) as tmp:
        stream = StreamingGGUF(tmp, metadata_writer(ts))
        for name, e in ts.entries.items():
            stream.add_tensor_info(name, e.type, e.shape)
        stored = {name: n.stored() for name, n in (norms or {}).items()}
        stream.begin()
        try:
            for name in ts.entries:
                data = trained[name].to_bytes() if name in trained else stored.get(name, ts.raw(name))
                stream.write(name, data)
            stream.finish()
        finally:
            stream.close()
        worst = _max_difference(tmp, trained, stored)
        if worst != 0:
            raise PocketError(f"internal: the written file decodes up to {worst:g} away from the trained weights")
    return worst


def _max_difference(path: Path, trained: dict[str, FakeQuant], stored: dict[str, np.ndarray]) -> float:
    ts = _gguf(path)
    worst = max((float(np.abs(ts.values(name) - v).max()) for name, v in stored.items()), default=0.0)
    for name, fq in trained.items():
        fmt = get_format(ts.entries[name].type)
        decoded = fmt.dequantize(ts.raw(name).reshape(-1, fmt.type_size)).reshape(fq.shape)
        with torch.no_grad():
            values = fq.in_file_order(fq().numpy())
        worst = max(worst, float(np.abs(decoded - values).max()))
    return worst


def _kquant_share(trained: dict[str, FakeQuant]) -> float:
    """The share of the trained weights stored as k-quants."""
    k = sum(fq.shape[0] * fq.shape[1] for fq in trained.values() if fq.is_kquant)
    return k / max(sum(fq.shape[0] * fq.shape[1] for fq in trained.values()), 1)


def _run_key(settings: dict, start_gguf: Path) -> str:
    """A checkpoint is continued only by the run that made it: same start file, settings, data and code."""
    import hashlib

    from ..util.cache import code_version
    from ..util.hashing import file_sha256

    code = code_version("quantize/qad", "quantize/qad_blocks", "quantize/fakequant", "distill/trainer", "distill/losses",
                        "distill/data")
    text = json.dumps({**settings, "start": file_sha256(start_gguf), "code": code}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def train_file(source, start_gguf: Path, out: Path, data: list[str], opts: QadOptions,
               ckpt_folder: Path | None = None, student_source=None, weighted_start: bool = False) -> dict:
    """Train the quantized file `start_gguf` against `source` (the teacher) on `data`; write
    `out`. The file is a quantization of `source`, or of `student_source` (a student distilled
    from it: its own shape, the teacher's vocabulary); `weighted_start`: it was made by gptq --fisher."""
    from ..distill.data import load_sequences
    from ..distill.signals import OnlineTeacher
    from ..distill.trainer import Checkpoint, TrainConfig, evaluate_student, train
    from ..models.load import load
    from ..util.machine import compute_device

    if opts.codes not in CODES:
        raise PocketError(f"unknown qad codes mode {opts.codes!r} ({', '.join(CODES)})")
    if opts.epochs < 1:
        raise PocketError(f"qad epochs must be at least 1, not {opts.epochs}")
    t0 = time.perf_counter()
    teacher = load(resolve(source))
    seqs = load_sequences(teacher.tokenizer, data, opts.seq, teacher.add_bos, max_train_tokens=opts.tokens)
    per_pass = max(1, math.ceil(opts.tokens / (opts.batch * (opts.seq - 1))))
    steps = opts.epochs * per_pass
    skeleton = teacher.model if student_source is None else load(resolve(student_source)).model
    student, trained, norms = build_student(skeleton, start_gguf, free_codes=opts.codes == "free", norms=opts.norms,
                                            sub_codes=opts.codes == "scales")
    del skeleton
    settings = {k: v for k, v in asdict(opts).items()
                if k not in ("resume", "progress", "eval_every", "save_every", "say", "teacher")}
    settings["teacher"] = model_content_hash(resolve(source))
    settings["data"] = seqs.fingerprint
    settings["student"] = None if student_source is None else str(student_source)
    ckpt = Checkpoint(ckpt_folder or out.with_name(out.name + ".ckpt"), _run_key(settings, start_gguf))
    kquant_share = _kquant_share(trained)  # the rate and the layer phase both go by it
    cfg = TrainConfig(loss="fkl", steps=steps, batch=opts.batch, micro_batch=opts.micro_batch,
                      lr=learning_rate(opts.lr, kquant_share),
                      warmup=max(1, steps // 10), weight_decay=0.0, eval_every=opts.eval_every,
                      save_every=opts.save_every, bf16=opts.bf16, seed=opts.seed, label="qad")
    signal = OnlineTeacher(teacher.model)
    baseline_file = ckpt.folder / "baseline.json"
    if opts.resume and ckpt.exists() and baseline_file.exists():  # the checkpoint holds the block phase's result
        baseline = json.loads(baseline_file.read_text())
    else:
        # the start file's own divergence, measured as training measures it, before anything moves
        baseline = {"start": evaluate_student(student, seqs.held_out, signal, cfg), "block_errors": []}
        # a distilled student's layers answer to no single layer of its original (layers dropped,
        # widths cut): matching them one by one trained each to the wrong target and made a 60 MB
        # student's file worse (below_floor.md, 2026-12-04), so a student trains end to end only
        block_tokens = (0 if student_source is not None
                        else layer_phase_tokens(opts.block_tokens, kquant_share, weighted_start))
        if block_tokens:
            from .qad_blocks import reconstruct_blocks

            n = max(1, math.ceil(block_tokens / (opts.seq - 1)))
            baseline["block_errors"] = reconstruct_blocks(student, teacher.model, list(seqs.train[:n]), opts.block_lr,
                                                          opts.block_epochs, opts.progress)
        ckpt.folder.mkdir(parents=True, exist_ok=True)
        write_json(baseline_file, baseline)
    teacher.model.to(compute_device(0), torch.bfloat16 if opts.bf16 else torch.float32)
    history = train(student, seqs.train, signal, seqs.held_out, signal, cfg, ckpt, opts.resume, opts.progress)
    student.to("cpu")
    end = [h for h in history if h.get("kld") is not None][-1]  # the last step is always evaluated
    kept_start = end["kld"] >= baseline["start"]["kld"]
    if kept_start:  # training made it worse on held-out text: the user gets the better file, and is told
        import shutil

        with atomic_path(Path(out)) as tmp:
            shutil.copyfile(start_gguf, tmp)
        worst = 0.0
        (opts.say or log.warning)(f"qad: held-out KLD {baseline['start']['kld']:.4f} -> {end['kld']:.4f}, worse than the "
                                  "file it started from: that file is kept")
    else:
        worst = write_trained(start_gguf, out, trained, norms)
    baseline_file.unlink(missing_ok=True)
    ckpt.remove()  # and its folder, once nothing else is left in it
    return {"kept_start": kept_start,
            "tokens": per_pass * opts.batch * (opts.seq - 1), "epochs": opts.epochs, "steps": steps, "lr": cfg.lr,
            "history": history, "start": baseline["start"],
            "end": {"ppl": end["ppl"], "kld": end["kld"]},
            "block_errors": baseline["block_errors"], "seconds": time.perf_counter() - t0, "max_difference": worst,
            "trained": sorted(trained), "norms": sorted(norms), "settings": settings}


def quantize_qad(source, out: Path, opts, qad: QadOptions) -> list:
    """gptq into the checkpoint folder (kept there, so an interrupted run resumes without
    redoing it), then training; returns quantize's report rows, the trained tensors' errors
    measured again (unweighted: the trained values answer to the logits, not to an importance)."""
    import dataclasses

    from ..data import general_text
    from ..distill.signals import FULL_MAX_PARAMS
    from ..distill.trainer import Checkpoint
    from ..models.tensors import open_tensors
    from ..util.cache import code_version
    from .pipeline import quantize_model

    ts = open_tensors(source)
    if qad.teacher is not None:
        t_vocab = open_tensors(qad.teacher).facts.vocab
        if t_vocab != ts.facts.vocab:
            raise PocketError(f"--teacher has a vocabulary of {t_vocab} tokens, the model {ts.facts.vocab}: they are compared "
                              "token by token, so the teacher must be the model this one was distilled from")
    n = ts.n_params()
    if n > FULL_MAX_PARAMS:  # before gptq: refused in a second, not after an hour
        raise PocketError(f"--method qad trains the whole model in float32 beside its original: for models up to "
                          f"{FULL_MAX_PARAMS / 1e9:.0f}B parameters (this one has {n / 1e9:.1f}B); use gptq")
    out = Path(out)
    folder = out.with_name(out.name + ".ckpt")
    start = folder / "start.gguf"
    start_opts = dataclasses.replace(opts, method="gptq")
    key = json.dumps({"source": model_content_hash(resolve(source)), "preset": opts.preset, "types": opts.types,
                      "calib": [str(Path(c).resolve()) for c in opts.calib], "calib_tokens": opts.calib_tokens,
                      "keep": opts.keep, "fisher": opts.fisher, "code": code_version("quantize", "models")}, sort_keys=True)
    stamp = folder / "start.json"
    if not (qad.resume and start.exists() and stamp.exists() and stamp.read_text() == key):
        Checkpoint(folder, "").refuse_unless(qad.resume)  # before gptq, not minutes later in training
        folder.mkdir(parents=True, exist_ok=True)
        reports = quantize_model(source, start, start_opts)
        stamp.write_text(key)
    else:
        (qad.say or log.info)(f"reusing the gptq file in {folder}")
        reports = None
    data = list(opts.calib) if opts.calib else general_text()
    if qad.teacher is None:
        result = train_file(source, start, out, data, qad, folder, weighted_start=opts.fisher)
    else:  # a distilled student: trained against the original it was distilled from
        result = train_file(qad.teacher, start, out, data, qad, folder, student_source=source, weighted_start=opts.fisher)
    (qad.say or log.info)(f"qad: {result['tokens']} tokens in {result['seconds']:.0f} s; held-out KLD to the original "
                          f"{result['start']['kld']:.4f} (gptq) -> {result['end']['kld']:.4f}; " +
                          ("the gptq file kept" if result["kept_start"] else "the file decodes to the trained "
                           f"weights exactly (max difference {result['max_difference']:g})"))
    if reports is None:
        from .pipeline import TensorReport

        reports = [TensorReport(n, e.shape, e.type, "gptq", 0.0) for n, e in _gguf(start).entries.items()]
    final = _gguf(out)
    for r in reports:
        if r.name in result["trained"] and not result["kept_start"]:
            a, b = ts.values(r.name), final.values(r.name)
            r.method, r.weighted_error = "qad", float(((a - b) ** 2).sum() / max(float((a * a).sum()), 1e-30))
    for f in (start, stamp):
        f.unlink(missing_ok=True)
    if folder.exists() and not any(folder.iterdir()):
        folder.rmdir()
    return reports

