"""Choosing every tensor's GGUF type under a size budget: a multiple-choice knapsack.

Each tensor has options (type, bytes, predicted loss); exactly one is taken per tensor, the
bytes must fit the budget and the summed loss is minimised. Solved exactly by dynamic
programming over the budget cut into 65,536 units (each option's bytes rounded up, so the
answer always fits; the rounding can waste at most one unit, ~1 KB for a 60 MB budget, per tensor), then a greedy pass
spends whatever the rounding left on the upgrades with the best loss saved per byte. A
Lagrangian relaxation was tried first: on small instances it missed the optimum by 10%.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..errors import PocketError
from .formats import get as get_format
from .plan import fits, tensor_bytes

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'60MB', '57.5 MiB', '1GB', '123456' -> bytes (MB = 10^6, MiB = 2^20)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise PocketError(f"cannot read the size {text!r}: write e.g. 60MB, 57.5MiB or 1GB")
    size = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if size <= 0:
        raise PocketError(f"the size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class Option:
    type: str
    bytes: int
    loss: float


def pareto(options: list[Option]) -> list[Option]:
    """Options by size, dropping any that a smaller one beats on loss."""
    kept: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bytes, o.loss)):
        if not kept or o.loss < kept[-1].loss:
            kept.append(o)
    return kept


def allocate(options: dict[str, list[Option]], budget: int, units: int = 1 << 16) -> dict[str, Option]:
    """The option per tensor with least total loss whose bytes sum to at most `budget`."""
    fronts = {name: pareto(opts) for name, opts in options.items()}
    smallest = sum(f[0].bytes for f in fronts.values())
    if smallest > budget:
        raise BudgetTooSmall(smallest)
    names = list(fronts)
    unit = max(1.0, budget / units)  # whole bytes when the budget is small: then the answer is exact
    units = int(budget // unit)
    cost = np.full(units + 1, np.inf)  # cost[b]: least loss of the tensors so far in exactly b units
    cost[0] = 0.0
    back = np.zeros((len(names), units + 1), dtype=np.int8)
    for i, name in enumerate(names):
        new = np.full(units + 1, np.inf)
        for j, option in enumerate(fronts[name]):
            w = math.ceil(option.bytes / unit)
            if w > units:
                break
            candidate = np.full(units + 1, np.inf)
            candidate[w:] = cost[:units + 1 - w] + option.loss
            better = candidate < new
            new[better] = candidate[better]
            back[i][better] = j
        cost = new
    if np.isfinite(cost).any():
        b = int(np.argmin(cost))
        choice = {}
        for i in reversed(range(len(names))):
            option = fronts[names[i]][back[i][b]]
            choice[names[i]] = option
            b -= math.ceil(option.bytes / unit)
    else:  # rounding pushed even the smallest choice over: start from it
        choice = {n: f[0] for n, f in fronts.items()}
    return _spend_rest(fronts, choice, budget - sum(o.bytes for o in choice.values()))


def _spend_rest(fronts: dict[str, list[Option]], choice: dict[str, Option], left: int) -> dict[str, Option]:
    while True:  # spend the rest where a byte saves the most loss
        best, best_gain = None, 0.0
        for name, front in fronts.items():
            at = front.index(choice[name])
            for up in front[at + 1:]:
                extra = up.bytes - choice[name].bytes
                if extra <= left:
                    gain = (choice[name].loss - up.loss) / extra
                    if gain > best_gain:
                        best, best_gain = (name, up), gain
        if best is None:
            return choice
        left -= best[1].bytes - choice[best[0]].bytes
        choice[best[0]] = best[1]


class BudgetTooSmall(PocketError):
    def __init__(self, smallest_tensors: int):
        super().__init__(f"the tensors alone need at least {smallest_tensors} bytes")
        self.smallest = smallest_tensors


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def types_for_budget(sens, target_bytes: int) -> dict[str, str]:
    """Every tensor's type for a file of at most `target_bytes` (sens: a sensitivity table)."""
    spare = target_bytes - sens.overhead - sens.fixed_bytes
    try:
        choice = allocate(sens.options(), spare)
    except BudgetTooSmall as exc:
        smallest = exc.smallest + sens.overhead + sens.fixed_bytes
        raise PocketError(f"{mb(target_bytes)} is below the smallest file this model quantizes to, {mb(smallest)} "
                          "(every tensor at its smallest type); raise the budget or distill a smaller model first") from None
    return {name: option.type for name, option in choice.items()}


def target_bytes(sens, target_size: str | None, target_bpw: float | None) -> int:
    if (target_size is None) == (target_bpw is None):
        raise PocketError("give one of --target-size or --target-bpw")
    if target_size is not None:
        return parse_size(target_size)
    assert target_bpw is not None  # exactly one of the two is given, checked above
    if not 1.0 <= target_bpw <= 32.0:
        raise PocketError(f"--target-bpw {target_bpw} is outside 1..32 bits per weight")
    return int(target_bpw * sens.n_params / 8)


# The types a budget chooses among. Here, not in sensitivity.py, so that the smallest possible
# file is known from shapes alone, before torch is even imported.
CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def candidates(cols: int, source_bpw: float) -> list[str]:
    """The types a tensor with rows of `cols` values may take: its rows split into their blocks,
    and no more bits per weight than the source already has."""
    return [t for t in CANDIDATES if fits(t, cols) and get_format(t).bits_per_weight <= source_bpw + 1e-9]


def source_bpw_of(entry) -> float:
    return get_format(entry.type).bits_per_weight if entry.type not in ("F32", "F16", "BF16") else 99.0


def _smallest(shapes_and_bpw) -> int:
    total = 0
    for shape, bpw in shapes_and_bpw:
        options = candidates(shape[-1], bpw) if len(shape) == 2 else []
        total += min((tensor_bytes(t, shape) for t in options), default=tensor_bytes("F32", shape))
    return total


def smallest_file_bytes(source) -> tuple[int, int, bool]:
    """(bytes of the smallest file a budget can make of this model, its parameter count, whether
    the bytes are exact), from the tensors' shapes alone: a budget below it is refused before any
    measuring. A GGUF gives it exactly. A HF folder gives a lower bound from the safetensors
    headers (the metadata left out), since its exact figure needs transformers' config and
    tokenizer, whose import alone takes seconds."""
    from ..models.source import resolve

    src = resolve(source)
    if src.is_gguf:
        from ..models.export_gguf import header_bytes
        from ..models.tensors import open_tensors

        ts = open_tensors(src)
        by_name = {n: list(ts.shape(n)) for n in ts.names}
        total = header_bytes(ts) + 32 * len(by_name) + _smallest((s, source_bpw_of(ts.entries[n])) for n, s in by_name.items())
        return total, sum(int(np.prod(s)) for s in by_name.values()), True
    import json

    from ..models.tensors import SafetensorsFile, shard_files

    try:
        tied = json.loads((src.path / "config.json").read_text()).get("tie_word_embeddings") is True
    except (OSError, ValueError, AttributeError):
        tied = False  # the full check reports a bad config; a lower bound just counts the head
    shapes = []
    for f in shard_files(src.path):
        st = SafetensorsFile(f)
        shapes += [list(st.shape(n)) for n in st.keys() if not (tied and n.endswith("lm_head.weight"))]
    float_bpw = 99.0  # a float checkpoint may take any candidate type
    return _smallest((s, float_bpw) for s in shapes), sum(int(np.prod(s)) for s in shapes), False
