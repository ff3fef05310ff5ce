"""The names of the distillation losses and tails, and the rules for them. Apart from
losses.py (torch) so that the CLI and the compress recipe refuse a bad name in a fraction of a
second, before torch is imported."""
from __future__ import annotations

from ..errors import PocketError

LOSSES = ("fkl", "rkl", "jsd", "tvd", "ce")
TAILS = ("bucket", "sample")
TARGETS = ("auto", "full", "sampled", "topk")  # the forms of the teacher's signal: signals.py
# The data's cross-entropy added to forward KL when --ce-weight is not given. fkl alone loses to
# plain ce on held-out perplexity at every budget measured, while fkl + 1 x ce beats it and keeps
# most of fkl's lead in KLD and top-1 (bench/results/distill.md, "adding ce to KD"; 0.5 and 2
# measured worse). The other divergences were not measured with it, so they keep 0.
FKL_CE_WEIGHT = 1.0


def parse_loss(spec: str) -> tuple[str, float | None]:
    """'fkl' | 'rkl' | 'tvd' | 'ce' | 'jsd:BETA' (BETA in (0, 1); 'jsd' alone means 0.5)."""
    name, _, arg = spec.partition(":")
    name = name.lower()
    if name not in LOSSES:
        raise PocketError(f"unknown --loss {spec!r} (choose one of fkl, rkl, jsd:BETA, tvd, ce)")
    if name != "jsd":
        if arg:
            raise PocketError(f"--loss {name} takes no parameter")
        return name, None
    try:
        beta = float(arg) if arg else 0.5
    except ValueError:
        raise PocketError(f"--loss jsd:BETA wants a number, got {arg!r}") from None
    if not 0.0 < beta < 1.0:
        raise PocketError(f"--loss jsd:{beta} needs 0 < BETA < 1")
    return name, beta


def resolve_ce_weight(loss: str, ce_weight: float | None) -> float:
    """--ce-weight as given, or its default for the loss (FKL_CE_WEIGHT with fkl, else 0)."""
    if ce_weight is not None:
        return ce_weight
    return FKL_CE_WEIGHT if loss == "fkl" else 0.0


def check_tail(loss: str, tail: str) -> None:
    """The one rule for --tail: the bucket works under every loss; the sampled tail term is an
    estimate of forward KL's missing part, so it means nothing for the other divergences."""
    if tail not in TAILS:
        raise PocketError(f"unknown --tail {tail!r} (choose one of {', '.join(TAILS)})")
    if tail == "sample" and loss != "fkl":
        raise PocketError(f"--tail sample works with --loss fkl only (it estimates forward KL's tail), not with {loss}")


def check_targets(loss: str, tail: str, targets: str, ce_weight: float | None = None, hidden_weight: float = 0.0) -> None:
    """The rules for --targets, with --loss, --tail, --ce-weight and --hidden-weight: draws
    estimate forward KL only, the tail term exists only where the top-k leaves a tail, the
    cross-entropy weight is added to a divergence, and the teacher's hidden states exist only
    where the teacher runs beside the student."""
    check_tail(loss, tail)
    if hidden_weight < 0 or (hidden_weight and targets not in ("full", "auto")):
        raise PocketError(f"--hidden-weight {hidden_weight}: a non-negative weight, and it needs --targets full (the "
                          "teacher's hidden states come from running it beside the student; none are cached)")
    if ce_weight is not None and (ce_weight < 0 or (ce_weight and loss == "ce")):  # None: resolve_ce_weight's default fits every loss
        raise PocketError(f"--ce-weight {ce_weight}: a non-negative weight of cross-entropy added to a divergence "
                          "(not to --loss ce)")
    if targets not in TARGETS:
        raise PocketError(f"unknown --targets {targets!r} (choose one of {', '.join(TARGETS)})")
    if targets == "sampled" and loss not in ("fkl", "ce"):
        raise PocketError(f"--targets sampled estimates forward KL only: use --loss fkl, not {loss}")
    if tail == "sample" and targets != "topk":
        raise PocketError("--tail sample completes the top-k's tail; it needs --targets topk")
