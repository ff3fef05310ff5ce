"""The distillation trainer and command: exact resume, DDP equivalence, the CLI, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import CORPUS, interrupt_once_started, make_tiny_llama
from safetensors.torch import load_file

import pocketlm.distill.trainer as trainer_mod
from pocketlm.cli import cli
from pocketlm.distill.teacher_cache import teacher_targets
from pocketlm.distill.trainer import Checkpoint, TrainConfig, train
from pocketlm.errors import PocketError
from pocketlm.models import load


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("teacher") / "t", hidden=256, heads=4, kv_heads=2, ffn=512, layers=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(CORPUS * 20)
    return p


def _fresh_student(folder: Path):
    return load(make_tiny_llama(folder, hidden=256, heads=4, kv_heads=2, ffn=512, layers=2, seed=3)).model


def test_interrupted_run_resumes_exactly(tiny_teacher, tmp_path, monkeypatch):
    teacher = load(tiny_teacher).model
    seqs = torch.randint(2, 390, (10, 24))
    held = torch.randint(2, 390, (2, 24))
    targets = teacher_targets(teacher, seqs, 8, "t", progress=False, bf16=False)
    held_t = teacher_targets(teacher, held, 8, "t", progress=False, bf16=False)
    cfg = TrainConfig(steps=6, batch=4, micro_batch=2, lr=1e-3, warmup=2, eval_every=3, save_every=3, bf16=False)

    straight = _fresh_student(tmp_path / "a")
    train(straight, seqs, targets, held, held_t, cfg, Checkpoint(tmp_path / "ck-a", "k"), resume=False, progress=False)

    real_rows = trainer_mod.batch_rows

    def crash_at_step_4(step, *args):
        if step == 4:
            raise RuntimeError("power cut")
        return real_rows(step, *args)

    ckpt = Checkpoint(tmp_path / "ck-b", "k")
    monkeypatch.setattr(trainer_mod, "batch_rows", crash_at_step_4)
    with pytest.raises(RuntimeError, match="power cut"):
        train(_fresh_student(tmp_path / "b"), seqs, targets, held, held_t, cfg, ckpt, resume=False, progress=False)
    monkeypatch.setattr(trainer_mod, "batch_rows", real_rows)
    assert torch.load(ckpt.path, weights_only=False)["step"] == 3

    with pytest.raises(PocketError, match="--resume"):
        train(_fresh_student(tmp_path / "c"), seqs, targets, held, held_t, cfg, ckpt, resume=False, progress=False)
    with pytest.raises(PocketError, match="another run"):
        train(_fresh_student(tmp_path / "c"), seqs, targets, held, held_t, cfg, Checkpoint(ckpt.folder, "other"),
              resume=True, progress=False)
    resumed = _fresh_student(tmp_path / "c")
    history = train(resumed, seqs, targets, held, held_t, cfg, ckpt, resume=True, progress=False)
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4, 5, 6]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _distill_args(teacher, out, data, *extra):
    return ["distill", str(teacher), "-o", str(out), "--data", str(data), "--seq", "32", "--tokens", "3000",
            "--batch", "4", "--micro-batch", "2", "--layers", "2", "--hidden", "256", "--ffn", "256", "--topk", "16",
            "--lr", "5e-4", "--eval-every", "8", *extra]


def test_distill_command_heals_the_pruned_student(tiny_teacher, corpus, tmp_path):
    out = tmp_path / "student"
    # KD alone: the tiny teacher's random predictions owe nothing to the corpus, so the data's
    # cross-entropy (the default mixture) would pull the student away from it
    res = CliRunner().invoke(cli, _distill_args(tiny_teacher, out, corpus, "--fp32", "--ce-weight", "0"))
    assert res.exit_code == 0, res.output
    assert "non-embedding parameters" in res.output and "predicted GGUF sizes" in res.output
    manifest = json.loads((out / "distill.json").read_text())
    history = [h for h in manifest["history"] if "kld" in h]
    assert history[0]["step"] == 0 and history[-1]["kld"] < 0.8 * history[0]["kld"]
    student = load(out)
    assert student.model.config.num_hidden_layers == 2 and student.model.config.intermediate_size == 256
    assert not out.with_name("student.ckpt").exists()


def test_distill_bad_input(tiny_teacher, corpus, tmp_path):
    runner = CliRunner()
    short = tmp_path / "short.txt"
    short.write_text("too short")
    other_vocab = make_tiny_llama(tmp_path / "other", vocab_size=300)
    (tmp_path / "exists").mkdir()
    cases = [(_distill_args(tiny_teacher, tmp_path / "o1", short), "fewer than one sequence"),
             (_distill_args(tiny_teacher, tmp_path / "o2", corpus, "--heads", "3", "--kv-heads", "2"), "whole groups"),
             (_distill_args(tiny_teacher, tmp_path / "o3", corpus, "--hidden", "512"), "--hidden 512"),
             (_distill_args(tiny_teacher, tmp_path / "o4", corpus, "--student", str(other_vocab)), "vocabulary"),
             (_distill_args(tiny_teacher, tmp_path / "o5", corpus, "--loss", "kl"), "unknown --loss"),
             (_distill_args(tiny_teacher, tmp_path / "o7", corpus, "--loss", "rkl", "--tail", "sample"), "fkl only"),
             (_distill_args(tiny_teacher, tmp_path / "o8", corpus, "--loss", "rkl", "--targets", "sampled"), "forward KL only"),
             (_distill_args(tiny_teacher, tmp_path / "o9", corpus, "--tail", "sample", "--targets", "full"), "--targets topk"),
             (_distill_args(tiny_teacher, tmp_path / "exists", corpus), "exists")]
    for args, words in cases:
        res = runner.invoke(cli, args)
        assert res.exit_code == 1 and words in res.output, (args, res.output)
        assert "Traceback" not in res.output
    foreign = tmp_path / "o6.ckpt"
    foreign.mkdir()
    torch.save({"key": "someone else"}, foreign / "last.pt")
    res = runner.invoke(cli, _distill_args(tiny_teacher, tmp_path / "o6", corpus, "--resume"))
    assert res.exit_code == 1 and "another run" in res.output
    assert (foreign / "last.pt").exists()


def test_two_processes_train_the_same_model_as_one(tiny_teacher, corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo) on the same global batch = 1 process."""
    exe = Path(sys.executable).with_name("pocketlm")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POCKETLM_CACHE": str(tmp_path / "cache")}
    kd = ("--fp32", "--ce-weight", "0")  # KD alone, so that "it trained" shows in the KLD (see the test above)
    one = subprocess.run([str(exe), *_distill_args(tiny_teacher, tmp_path / "one", corpus, *kd)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(exe), *_distill_args(tiny_teacher, tmp_path / "two", corpus, *kd)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-5, rtol=1e-4), name
    h1 = json.loads((tmp_path / "one" / "distill.json").read_text())["history"]
    h2 = json.loads((tmp_path / "two" / "distill.json").read_text())["history"]
    assert [h["step"] for h in h1] == [h["step"] for h in h2]
    assert h1[-1]["kld"] < h1[0]["kld"]  # it trained: the equality above is not the untouched init
    assert h2[-1]["kld"] == pytest.approx(h1[-1]["kld"], rel=1e-3)


def test_ctrl_c_saves_a_checkpoint_that_resume_finishes(tiny_teacher, corpus, tmp_path):
    exe = Path(sys.executable).with_name("pocketlm")
    env = {**os.environ, "POCKETLM_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "student"
    total_steps = 49  # 6,000 tokens / (4 sequences x 31 scored tokens): ~2 s of steps
    args = [str(exe), *_distill_args(tiny_teacher, out, corpus, "--fp32", "--tokens", "6000")]
    code, rest = interrupt_once_started(args, env, "tok_s=", wait=0.2)  # once the first step has reported
    assert code == 1 and "checkpoint saved" in rest, rest[-1500:]
    assert "Traceback" not in rest and not out.exists()
    step = torch.load(tmp_path / "student.ckpt" / "last.pt", weights_only=False)["step"]
    assert 1 <= step < total_steps
    res = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    steps = [h["step"] for h in json.loads((out / "distill.json").read_text())["history"]]
    assert steps == list(range(0, steps[-1] + 1)) and steps[-1] == total_steps
    assert not (tmp_path / "student.ckpt").exists()


def test_a_finished_run_continues_with_more_tokens(tiny_teacher, corpus, tmp_path):
    runner = CliRunner()
    out = tmp_path / "student"
    assert runner.invoke(cli, _distill_args(tiny_teacher, out, corpus, "--fp32")).exit_code == 0
    first = json.loads((out / "distill.json").read_text())
    assert first["targets"] == "full"  # a tiny teacher runs beside its student by default
    assert (first["loss"], first["ce_weight"]) == ("fkl", 1.0)  # and the default mixture is recorded as a number
    for extra, words in ((["--lr", "1e-3"], "other settings: lr"), ([], "larger --tokens"), (["--no-resume"], "exists")):
        args = _distill_args(tiny_teacher, out, corpus, "--fp32", *([] if extra == ["--no-resume"] else ["--resume"]),
                             *([] if extra == ["--no-resume"] else extra))
        res = runner.invoke(cli, args)
        assert res.exit_code == 1 and words in res.output, (extra, res.output)
    res = runner.invoke(cli, _distill_args(tiny_teacher, out, corpus, "--fp32", "--resume", "--tokens", "6000"))
    assert res.exit_code == 0, res.output
    assert "continuing" in res.output and not out.with_name("student.ckpt").exists()
    second = json.loads((out / "distill.json").read_text())
    assert second["steps"] > first["steps"] and second["continued_from_tokens"] == [first["tokens"]]
    assert second["history"][:len(first["history"])] == first["history"]
    assert [h["step"] for h in second["history"]] == list(range(second["steps"] + 1))
    assert second["history"][-1]["kld"] < first["history"][-1]["kld"]


def test_a_continued_run_warms_up_again_into_the_longer_schedule():
    cfg = TrainConfig(steps=100, warmup=5, rewarm_from=40)
    longer = TrainConfig(steps=100, warmup=5)
    assert trainer_mod.lr_factor(40, cfg) == pytest.approx(trainer_mod.lr_factor(40, longer) / 5)
    assert trainer_mod.lr_factor(44, cfg) == trainer_mod.lr_factor(44, longer)
    assert [trainer_mod.lr_factor(s, cfg) for s in range(45, 100)] == [trainer_mod.lr_factor(s, longer) for s in range(45, 100)]
    assert [trainer_mod.lr_factor(s, cfg) for s in range(40)] == [trainer_mod.lr_factor(s, longer) for s in range(40)]


def test_iterative_pruning_cuts_a_healed_intermediate(corpus, tmp_path):
    from pocketlm.distill.run import DistillOptions
    from pocketlm.distill.stages import distill_iteratively

    teacher = make_tiny_llama(tmp_path / "t", hidden=256, heads=4, kv_heads=2, ffn=1024, layers=4)
    final = {"layers": 2, "hidden": 128, "heads": 2, "kv_heads": 1, "ffn": 256}
    opts = DistillOptions(data=[corpus], tokens=1500, seq=64, batch=4, progress=False, eval_every=10**9,
                          targets="full", hidden_weight=0.5)
    m = distill_iteratively(teacher, tmp_path / "s", opts, final)
    (stage,) = m["stages"]
    assert stage["shape"]["ffn"] == 512 and len(stage["shape"]["keep_layers"]) == 3  # halfway in layers and MLP
    assert len(m["shape"]["keep_layers"]) == 2 and max(m["shape"]["keep_layers"]) <= 2  # indices of the 3-layer model
    assert m["settings"]["prune_from"].endswith("s.stage1") and not (tmp_path / "s.stage1").exists()
    assert m["tokens"] >= 1500 and stage["tokens"] >= 500 and stage["held_out"]["kld"] > 0
    # the hidden-state loss compares the final student with the teacher's channels it kept through both cuts
    ch = m["channels"]
    assert len(ch) == 128 and len(set(ch)) == 128 and max(ch) < 256 and m["settings"]["hidden_weight"] == 0.5
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["hidden_size"]) == (2, 256, 128)
    with pytest.raises(PocketError, match="--heads 5 must be between 1 and the teacher's 4"):  # checks still hold
        distill_iteratively(teacher, tmp_path / "x", opts, {**final, "heads": 5, "kv_heads": 5})
