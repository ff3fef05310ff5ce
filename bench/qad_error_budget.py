"""Where a quantized file's divergence from its original comes from, by tensor kind and by depth:
the original model with only that part taken from the file (dequantized exactly as qad trains it),
mean KLD per token against the original on held-out text. Made to ask why qad's k-quant files stop
short (bench/results/qad.md, section student512-100k-xeon).

    .venv/bin/python bench/qad_error_budget.py MODEL FILE.gguf HELD_OUT.txt [--seqs 16]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pocketlm.distill.signals import OnlineTeacher  # noqa: E402
from pocketlm.distill.trainer import TrainConfig, evaluate_student  # noqa: E402
from pocketlm.eval.windows import make_windows  # noqa: E402
from pocketlm.models.load import load  # noqa: E402
from pocketlm.quantize.fakequant import QuantLinear  # noqa: E402
from pocketlm.quantize.qad import build_student  # noqa: E402
from pocketlm.quantize.qad_options import QadOptions  # noqa: E402

# the KLD as qad's training measures it, in float32 (the committed numbers were measured in float32)
EVAL = TrainConfig(micro_batch=4, bf16=False)


class OriginalOnce:
    """The original's distributions for the held-out windows, computed at the first variant and
    given to every later one (each variant differs only in the student)."""

    def __init__(self, model):
        self.online, self.done = OnlineTeacher(model), {}

    def batch(self, rows: torch.Tensor, ids: torch.Tensor):
        key = int(rows[0])
        if key not in self.done:
            self.done[key] = self.online.batch(rows, ids)
        return self.done[key]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="the original (a folder or name pocketlm loads)")
    ap.add_argument("file", type=Path, help="a quantization of it (GGUF)")
    ap.add_argument("held_out", type=Path, help="text neither calibrated nor trained on")
    ap.add_argument("--seqs", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    original = load(args.model)
    ids = original.tokenizer(args.held_out.read_text()[:200_000])["input_ids"]
    bos = original.tokenizer.bos_token_id if original.add_bos else None
    seqs = torch.from_numpy(make_windows(ids, QadOptions.seq, bos).inputs[:args.seqs])  # qad's own window length
    teacher = original.model.float().eval()
    reference = OriginalOnce(teacher)
    student, _, _ = build_student(teacher, args.file, free_codes=False)
    quantized = [name for name, mod in student.named_modules() if isinstance(mod, QuantLinear)]
    originals = dict(teacher.named_modules())

    def kld(model) -> float:
        return evaluate_student(model, seqs, reference, EVAL)["kld"]

    def only(keep, embedding: bool) -> float:
        """The original with the file's matrices where keep(name), and the file's embedding table if embedding."""
        model = copy.deepcopy(student)
        for name in quantized:
            if not keep(name):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, copy.deepcopy(originals[name]))
        if not embedding:
            model.get_input_embeddings().weight.data.copy_(teacher.get_input_embeddings().weight.data)
            if not teacher.config.tie_word_embeddings:
                model.get_output_embeddings().weight.data.copy_(teacher.get_output_embeddings().weight.data)
        return kld(model)

    print("| only this part from the file | mean KLD |\n|---|---|")
    print(f"| all of it | {kld(student):.4f} |")
    for kind in sorted({name.split(".")[-1] for name in quantized}):
        print(f"| {kind} | {only(lambda n, k=kind: n.split('.')[-1] == k, False):.4f} |", flush=True)
    print(f"| embedding | {only(lambda n: False, True):.4f} |")
    layers = teacher.config.num_hidden_layers
    for lo in range(0, layers, -(-layers // 3)):
        hi = min(layers, lo - (-layers // 3))
        print(f"| layers {lo}-{hi - 1} | {only(lambda n, lo=lo, hi=hi: lo <= int(n.split('.')[2]) < hi, False):.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
