"""Terminal rendering of info and eval results (rich tables)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    x = n / 1024
    for unit in ("KiB", "MiB"):
        if x < 1024:
            return f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


def print_info(d: dict) -> None:
    t = Table(title=f"{d['model']}", show_header=False)
    rows = [
        ("path", d["path"]), ("format", d["format"]), ("architecture", d["architecture"]),
        ("parameters", f"{d['n_params']:,} ({d['n_embedding_params']:,} embedding, {d['n_non_embedding_params']:,} other)"),
        ("context length", str(d["context_length"])), ("vocabulary", str(d["vocab_size"])),
        ("file size", human_bytes(d["file_size"])), ("bits per weight", f"{d['bpw']:.3f}"),
        ("chat template", "yes" if d["chat_template"] else "no"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    types = Table(title="tensor types")
    for col in ("type", "tensors", "parameters"):
        types.add_column(col, justify="right" if col != "type" else "left")
    for r in d["types"]:
        types.add_row(r["type"], str(r["tensors"]), f"{r['params']:,}")
    console.print(types)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_eval(d: dict) -> None:
    t = Table(title=f"eval: {d['model']} ({d['backend']})")
    cols = [("size", human_bytes(d["size_bytes"])), ("bpw", _fmt(d["bpw"], ".3f")), ("tokens", _fmt(d["tokens"], ",")),
            ("PPL", _fmt(d["ppl"], ".4f"))]
    if d.get("reference"):
        cols += [("ref PPL", _fmt(d.get("reference_ppl"), ".4f")), ("KLD mean", _fmt(d["kld_mean"], ".5f")),
                 ("KLD p99", _fmt(d["kld_p99"], ".4f")),
                 ("top-1", "-" if d["top1"] is None else f"{100 * d['top1']:.2f}%")]
    if d.get("mmlu_n") is not None:
        cols.append((f"MMLU ({d['mmlu_n']})", "-" if d["mmlu_acc"] is None else f"{100 * d['mmlu_acc']:.1f}%"))
    if d.get("prefill_tps") is not None:
        cols += [("prefill tok/s", f"{d['prefill_tps']:.0f}"), ("decode tok/s", f"{d['decode_tps']:.1f}"),
                 ("peak RSS", f"{d['peak_rss_mb']:.0f} MiB")]
    for name, _ in cols:
        t.add_column(name, justify="right")
    t.add_row(*[v for _, v in cols])
    console.print(t)
    if d.get("reference"):
        console.print(f"reference: {d['reference']} ({d['reference_backend']}); KLD over the full vocabulary")


def print_quantize(reports) -> None:
    t = Table(title="quantized tensors")
    for col in ("tensor", "shape", "type", "method", "weighted error"):
        t.add_column(col, justify="left" if col in ("tensor", "type", "method") else "right")
    for r in reports:
        t.add_row(r.name, "x".join(map(str, r.shape)), r.type, r.method, f"{r.weighted_error:.2e}")
    console.print(t)


def print_allocation(sens, types: dict[str, str], target: int) -> None:
    """A budget's allocation: per type (how many tensors, bytes, predicted KLD), then totals."""
    from .quantize.plan import tensor_bytes

    rows: dict[str, list] = {}
    for name, info in sens.tensors.items():
        r = rows.setdefault(types[name], [0, 0, 0.0, set()])
        r[0] += 1
        r[1] += tensor_bytes(types[name], info["shape"])
        r[2] += sens.loss(name, types[name])
        r[3].add(name.split(".")[-2] if name.startswith("blk.") else name.removesuffix(".weight"))
    t = Table(title="allocation (predicted KLD from measured sensitivity)")
    for col in ("type", "tensors", "size", "predicted KLD", "kinds"):
        t.add_column(col, justify="left" if col in ("type", "kinds") else "right")
    for type_name, (n, size, loss, kinds) in sorted(rows.items(), key=lambda x: -x[1][1]):
        t.add_row(type_name, str(n), human_bytes(size), f"{loss:.4f}", ", ".join(sorted(kinds)))
    console.print(t)
    total = sens.file_bytes(types)
    console.print(f"file {total / 1e6:.2f} MB of a {target / 1e6:.2f} MB budget, "
                  f"{8 * total / sens.n_params:.2f} bits per weight, predicted KLD {sens.predicted_kld(types):.4f}")


def print_students(d: dict, target: int) -> None:
    from .distill.choose import Candidate, table

    fields = set(Candidate.__dataclass_fields__)
    cands = [Candidate(**{k: v for k, v in c.items() if k in fields}) for c in d["candidates"]]
    finals = [c for c in cands if c.label in d["finalists"]]
    rows = table(cands, finals)
    what = (f"{d['memory'] / 1e6:.0f} MB of memory at --ctx {d['ctx']}" if d.get("memory") else f"{target / 1e6:.1f} MB")
    t = Table(title=f"{len(cands)} student shapes fit {what} (quantization alone: "
                    f"{d['smallest_quantized'] / 1e6:.1f} MB at least)")
    for col in rows[0]:
        t.add_column(col, justify="right")
    for r in rows[1:]:
        t.add_row(*r)
    console.print(t)
    console.print("`pocketlm compress` pilot-heals the finalists, quantizes each to the budget and keeps the one whose "
                  "KLD after healing plus the KLD its file adds is least; bpw: the bits per weight the budget leaves "
                  "each shape's matrices.")
