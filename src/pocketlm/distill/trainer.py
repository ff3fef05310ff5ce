"""The healing loop: AdamW, warmup + cosine, gradient accumulation, bf16 autocast, held-out
evaluation, exact resume, and DistributedDataParallel when started by torchrun.

The data order is a pure function of (seed, step): epoch e visits the training sequences in
the permutation seeded by seed + e, and step s takes the next `batch` of them. A resumed run
therefore sees exactly the sequences the uninterrupted run would have, and under DDP each
rank takes its contiguous share of the same global batch, so N processes train the model
one process would (gradients are averaged over equal shares).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import PocketError
from ..util.atomic import atomic_path
from ..util.machine import compute_device
from .losses import distill_loss, hidden_loss
from .signals import OnlineTeacher
from .teacher_cache import SampledTargets, TeacherTargets


@dataclass
class TrainConfig:
    loss: str = "fkl"
    beta: float | None = None
    tail: str = "bucket"  # see losses.py: "sample" adds the data token's share of forward KL's tail
    ce_weight: float = 0.0  # adds this much of the data's cross-entropy to a divergence
    hidden_weight: float = 0.0  # adds this much of the final hidden state's cosine distance (losses.hidden_loss)
    steps: int = 100
    batch: int = 8  # sequences per optimizer step, over all processes
    micro_batch: int = 2  # sequences per forward/backward on one process
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50
    save_every: int = 50
    bf16: bool = True
    seed: int = 0
    rewarm_from: int = 0  # a finished run continued: warm up again from this step (fresh optimizer)
    label: str = "distill"  # what the progress bar calls the run


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def batch_rows(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """The global batch of sequence indices for an optimizer step."""
    start, rows = step * batch, list[int]()
    while len(rows) < batch:
        epoch, offset = divmod(start + len(rows), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        rows += perm[offset: offset + batch - len(rows)].tolist()
    return torch.tensor(rows)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.rewarm_from and cfg.rewarm_from <= step < cfg.rewarm_from + cfg.warmup:
        # the continued run's schedule is the one a run of the new length would have, entered
        # at the old end; Adam's moments start from zero there, hence the ramp
        factor *= (step - cfg.rewarm_from + 1) / cfg.warmup
    return factor


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


Targets = TeacherTargets | SampledTargets | OnlineTeacher


def evaluate_student(model, seqs: torch.Tensor, targets: Targets | None, cfg: TrainConfig) -> dict:
    """Held-out perplexity, and the KL divergence from the teacher as its signal gives it (exact
    over the vocabulary, estimated from draws, or folded onto the top-k)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = kld = 0.0
    count = 0
    with torch.no_grad(), _autocast(cfg, device):
        for b0 in range(0, len(seqs), cfg.micro_batch):
            ids = seqs[b0:b0 + cfg.micro_batch].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            n = ids[:, 1:].numel()
            nll += distill_loss("ce", None, logits, ids[:, 1:], None).item() * n
            if targets is not None:
                rows = torch.arange(b0, b0 + len(ids))
                teacher = targets.batch(rows, ids).to(device)
                kld += distill_loss("fkl", None, logits, ids[:, 1:], teacher).item() * n
            count += n
    model.train(was_training)
    return {"ppl": math.exp(nll / count), "kld": kld / count if targets is not None else None}


class Checkpoint:
    """last.pt in a folder beside the output, written atomically; `key` names the run so a
    checkpoint of another run is never continued."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        self.path = folder / "last.pt"

    def exists(self) -> bool:
        return self.path.exists()

    def refuse_unless(self, resume: bool) -> None:
        """An unfinished run is continued only when asked: never silently, never overwritten."""
        if self.exists() and not resume:
            raise PocketError(f"an unfinished run left a checkpoint in {self.folder}: pass --resume to continue it, "
                              "or remove that folder to start over")

    def save(self, model, optimizer, step: int, history: list) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"key": self.key, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "history": history, "rng": torch.get_rng_state()}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self) -> dict:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated or foreign file: say so, do not guess
            raise PocketError(f"cannot read checkpoint {self.path}: {exc}") from None
        if state.get("key") != self.key:
            raise PocketError(f"the checkpoint in {self.folder} belongs to another run (different teacher, data, shape or "
                              "settings); remove that folder or use another -o")
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.folder.exists() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def train(model, train_seqs: torch.Tensor, targets: Targets | None, held_seqs: torch.Tensor,
          held_targets: Targets | None, cfg: TrainConfig, ckpt: Checkpoint, resume: bool,
          progress: bool = True, continue_from: tuple[int, list] | None = None) -> list[dict]:
    """continue_from: (steps done, history) of a finished run whose model is `model`; the
    steps from there to cfg.steps are trained (cfg.rewarm_from says where the ramp starts)."""
    dist_ctx = Dist.from_env()
    device = compute_device(dist_ctx.local_rank)
    model.to(device).train()
    if cfg.batch % (dist_ctx.world * cfg.micro_batch):
        raise PocketError(f"--batch {cfg.batch} must be a multiple of micro-batch {cfg.micro_batch} x {dist_ctx.world} processes")
    wrapped = model
    if dist_ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start, history = (continue_from[0], list(continue_from[1])) if continue_from else (0, [])
    ckpt.refuse_unless(resume)
    if ckpt.exists():
        state = ckpt.load()
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, history = state["step"], state["history"]
    share = cfg.batch // dist_ctx.world
    tokens_per_step = cfg.batch * (train_seqs.shape[1] - 1)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.label} ({cfg.loss})", unit="step",
               disable=not (progress and dist_ctx.main))
    stop = _StopRequest()
    try:
        if start == 0:  # the student as pruned, before any healing: the baseline the run improves on
            history.append({"step": 0, **evaluate_student(model, held_seqs, held_targets, cfg)})
        t0 = time.perf_counter()
        for step in range(start, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg)
            rows = batch_rows(step, cfg.batch, len(train_seqs), cfg.seed)[dist_ctx.rank * share:(dist_ctx.rank + 1) * share]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            micro = list(torch.split(rows, cfg.micro_batch))
            for j, mrows in enumerate(micro):
                ids = train_seqs[mrows].to(device)
                teacher = None if targets is None else targets.batch(mrows, ids).to(device)
                sync = j == len(micro) - 1 or dist_ctx.world == 1
                with (contextlib.nullcontext() if sync else wrapped.no_sync()):
                    with _autocast(cfg, device):
                        out = wrapped(input_ids=ids, use_cache=False, output_hidden_states=bool(cfg.hidden_weight))
                    loss = distill_loss(cfg.loss, cfg.beta, out.logits[:, :-1], ids[:, 1:], teacher, cfg.tail,
                                        cfg.ce_weight)
                    if cfg.hidden_weight:
                        loss = loss + cfg.hidden_weight * hidden_loss(out.hidden_states[-1][:, :-1], teacher)
                    loss = loss / len(micro)
                    loss.backward()
                step_loss += loss.item()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            done = step + 1
            rate = (done - start) * tokens_per_step / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            record = {"step": done, "loss": step_loss, "lr": optimizer.param_groups[0]["lr"], "tok_s": rate}
            if done % cfg.eval_every == 0 or done == cfg.steps:
                record.update(evaluate_student(model, held_seqs, held_targets, cfg))
                if dist_ctx.main:
                    bar.write(f"step {done}: held-out ppl {record['ppl']:.3f}"
                              + (f", kld {record['kld']:.4f}" if record.get("kld") is not None else ""))
            history.append(record)
            if stop.requested and done < cfg.steps:
                if dist_ctx.main:
                    ckpt.save(model, optimizer, done, history)
                raise PocketError(f"interrupted after step {done}/{cfg.steps}; checkpoint saved in {ckpt.folder}: "
                                  "rerun the same command with --resume")
            if dist_ctx.main and done % cfg.save_every == 0 and done < cfg.steps:
                ckpt.save(model, optimizer, done, history)
    finally:
        stop.restore()
        bar.close()
    dist_ctx.barrier()
    return history


class _StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step (so the checkpoint holds
    whole steps and resumes exactly); a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)", flush=True)
        self.restore()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
