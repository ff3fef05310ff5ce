"""What pocketlm costs at the sizes people run: 1B, 3B and 8B checkpoints, side by side with llama.cpp.

Writes synthetic checkpoints with the public shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B
(bf16 safetensors in 2 GB shards with an index, random weights with a few heavy input channels in
every norm, SmolLM2's real tokenizer padded to 128,256 rows), then times each job as a user runs it
(the `pocketlm` command) and as llama.cpp's own tools run it, measuring wall time, peak RSS of the
whole process tree, extra disk used at peak (free space of the filesystem) and output size, and
checks that every file loads in llama.cpp and generates. The weights are random, so no quality is
reported: only what memory, disk and time cost.

  .venv/bin/python bench/scale.py [--shapes 1B,3B,8B] [--jobs rtn,imatrix,gptq,target,f16,llama,llama-imatrix]

Work files (checkpoints, outputs) live in ~/.cache/pocketlm-bench/scale/ and are reused by reruns.
Every measured row goes to bench/results/scale.json (a rerun of one job replaces its row) and the
whole table to bench/results/scale.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from results_file import save_results  # noqa: E402
from scale_report import CALIB_TOKENS, JOBS, report, shape_config  # noqa: E402

from pocketlm.util.atomic import write_json  # noqa: E402
from pocketlm.util.machine import machine_name  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "text" / "wiki.txt"
CACHE = Path(os.environ.get("POCKETLM_BENCH_CACHE", Path.home() / ".cache" / "pocketlm-bench")) / "scale"
RESULTS = ROOT / "bench" / "results" / "scale.md"
ROWS = RESULTS.with_suffix(".json")
PL = [str(ROOT / ".venv" / "bin" / "pocketlm")]
DEVICE_RUN = False
def make_checkpoint(shape: str) -> Path:
    """Random bf16 weights, written a tensor at a time (no whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = CACHE / f"llama-{shape}"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                      bos_token_id=1, eos_token_id=2, dtype="bfloat16", **shape_config(shape))
    cfg.save_pretrained(tmp)
    _copy_tokenizer(tmp)
    h, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    # a GPU machine draws the 8 billion numbers in seconds where its CPU takes minutes of a 10-minute
    # lease (other numbers, as random: only the cost of what is made from them is measured)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(dev).manual_seed(0)

    def lin(rows, cols):
        return (torch.randn(rows, cols, generator=gen, device=dev) * cols ** -0.5).to(torch.bfloat16).cpu()

    def norm():
        w = torch.ones(h, device=dev)
        w[torch.randint(0, h, (4,), generator=gen, device=dev)] = 20.0  # heavy input channels, as trained models have
        return w.to(torch.bfloat16).cpu()

    tensors = [("model.embed_tokens.weight",
                lambda: (torch.randn(128256, h, generator=gen, device=dev) * 0.02).to(torch.bfloat16).cpu())]
    for i in range(n):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", norm), (p + "post_attention_layernorm.weight", norm),
                    (p + "self_attn.q_proj.weight", lambda: lin(q, h)), (p + "self_attn.k_proj.weight", lambda: lin(kv, h)),
                    (p + "self_attn.v_proj.weight", lambda: lin(kv, h)), (p + "self_attn.o_proj.weight", lambda: lin(h, q)),
                    (p + "mlp.gate_proj.weight", lambda: lin(f, h)), (p + "mlp.up_proj.weight", lambda: lin(f, h)),
                    (p + "mlp.down_proj.weight", lambda: lin(h, f))]
    tensors.append(("model.norm.weight", norm))
    if not cfg.tie_word_embeddings:
        tensors.append(("lm_head.weight", lambda: lin(128256, h)))
    shard, size, weight_map, shards = {}, 0, {}, []

    def flush():
        nonlocal shard, size
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shards.append(name)
        shard, size = {}, 0

    for name, make in tensors:
        t = make()
        shard[name] = t
        size += t.numel() * 2
        if size >= 2 * 10**9:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(folder)
    return folder


def _copy_tokenizer(dest: Path) -> None:
    """SmolLM2's tokenizer (a real BPE vocabulary), from pocketlm's cached HF copy of the default model,
    or from the folder POCKETLM_SCALE_TOKENIZER names (a GPU machine has no default model installed)."""
    if os.environ.get("POCKETLM_SCALE_TOKENIZER"):
        src = Path(os.environ["POCKETLM_SCALE_TOKENIZER"])
    else:
        from pocketlm.models.load import hf_folder

        src = hf_folder("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, dest / name)


def measure(cmd: list[str], disk_dir: Path, trace: Path | None = None) -> dict:
    """Wall seconds, peak RSS of the whole process tree, and the most disk space it took.
    trace: a file for the RSS and disk samples over time (where in a run memory peaks, and
    whether it grows layer after layer). The command's output goes to a file beside the trace
    (a pipe read only at the end would stall a command that prints progress; a run cut short
    still leaves what it printed)."""
    import psutil

    free0 = shutil.disk_usage(disk_dir).free
    t0 = time.time()
    out_path = disk_dir / f"{trace.name.split('.')[0] if trace else 'job'}.log"
    out_file = open(out_path, "w")
    proc = subprocess.Popen(cmd, stdout=out_file, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak_rss, min_free, samples = 0, free0, []
    # written as it goes: a run stopped by hand (hours at 3B-8B) still leaves its trace
    log = open(trace, "w") if trace is not None else None
    if log is not None:
        log.write("seconds\trss_gib\tdisk_gb\n")
    while proc.poll() is None:
        rss = 0
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            peak_rss = max(peak_rss, rss)
        except psutil.Error:
            pass
        free = shutil.disk_usage(disk_dir).free
        min_free = min(min_free, free)
        samples.append(f"{time.time() - t0:.1f}\t{rss / 2**30:.3f}\t{(free0 - free) / 1e9:.3f}\n")
        if log is not None and len(samples) >= 50:
            log.writelines(samples)
            log.flush()
            samples = []
        time.sleep(0.2)
    if log is not None:
        log.writelines(samples)
        log.close()
    out_file.close()
    out = out_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_gib": round(peak_rss / 2**30, 2),
            "disk_gb": round(max(free0 - min_free, 0) / 1e9, 2)}


def generates(path: Path) -> bool | None:
    """Whether llama.cpp loads the file and generates; None where llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    code = ("import llama_cpp,sys; m=llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=2, verbose=False);"
            "r=m('The river', max_tokens=4); sys.exit(0 if r['usage']['completion_tokens']>0 else 1)")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=1800).returncode == 0


def run_job(shape: str, job: str, ckpt: Path, calib: Path, tools: Path | None) -> dict:
    work = CACHE / f"out-{shape}"
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{job}.gguf"
    # a GPU machine's run keeps the progress bars: its log then says how far a run cut off at the
    # lease's end had come, and at what pace
    q = [*PL, "quantize", str(ckpt), "-o", str(out), "--force"] + ([] if DEVICE_RUN else ["--quiet"])
    calib_args = ["--calib", str(calib), "--calib-tokens", str(CALIB_TOKENS)]
    f16 = work / "f16.gguf"
    if job in ("rtn", "imatrix", "gptq"):
        cmd = q + ["--type", "Q4_K_M", "--method", job] + (calib_args if job != "rtn" else [])
    elif job == "target":
        # rtn, imatrix and gptq choose the same type for every tensor, so any of their files gives
        # the Q4_K_M size (rtn's is the cheapest to make: ~4 minutes at 3B against ~1 hour)
        made = [work / f"{m}.gguf" for m in ("gptq", "imatrix", "rtn") if (work / f"{m}.gguf").exists()]
        if not made:
            raise SystemExit(f"error: the target job needs {shape}'s Q4_K_M size: run its rtn job first")
        size = made[0].stat().st_size
        cmd = q + ["--target-size", f"{size}B", "--method", "gptq"] + calib_args
    elif job == "f16":
        cmd = [*PL, "export", str(ckpt), "-o", str(f16), "--type", "f16", "--force"]
    elif job == "llama":
        cmd = [str(tools / "llama-quantize"), str(f16), str(out), "Q4_K_M", "2"]
    elif job == "llama-imatrix":
        imat = work / "imatrix.dat"
        chunks = CALIB_TOKENS // 512
        script = (f"{tools}/llama-imatrix -m {f16} -f {calib} -o {imat} -c 512 -t 2 --no-ppl --chunks {chunks} && "
                  f"{tools}/llama-quantize --imatrix {imat} {f16} {out} Q4_K_M 2")
        cmd = ["bash", "-c", script]
    else:
        raise ValueError(job)
    row = measure(cmd, work, trace=work / f"{job}.rss.tsv")
    path = f16 if job == "f16" else out
    row.update(shape=shape, job=job, machine=machine_name(), output_gb=round(path.stat().st_size / 1e9, 3),
               loads_and_generates=generates(path))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1B,3B,8B")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--layers", type=int, default=None,
                    help="only the first N decoder layers of each shape (rows named e.g. 8B-2L): per-layer cost "
                         "without the whole model's time")
    ap.add_argument("--device-run", metavar="PREFIX",
                    help="a GPU machine's run (bench/device_check.sh): rows go to PREFIX.json and PREFIX.md, apart "
                         "from this machine's; pocketlm runs as `python -m pocketlm`")
    ap.add_argument("--report-only", action="store_true", help="rewrite the results file from the json, run nothing")
    args = ap.parse_args()
    global RESULTS, ROWS, PL, DEVICE_RUN
    if args.device_run:
        RESULTS, ROWS, PL = Path(args.device_run + ".md"), Path(args.device_run + ".json"), [sys.executable, "-m", "pocketlm"]
        DEVICE_RUN = True
    if args.report_only:
        save_results(RESULTS, report(json.loads(ROWS.read_text()), DEVICE_RUN))
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    calib = CACHE / "calib.txt"
    if not calib.exists():
        text = WIKI.read_text()
        calib.write_text(text[: int(len(text) * 0.8)][:400_000])
    tools = None
    if any(j.startswith("llama") for j in args.jobs.split(",")):
        out = subprocess.run(["bash", str(ROOT / "bench" / "build_llamacpp_tools.sh")], capture_output=True, text=True, check=True)
        tools = Path(out.stdout.strip().splitlines()[-1])
    rows = json.loads(ROWS.read_text()) if ROWS.exists() else []
    for shape in args.shapes.split(","):
        shape = f"{shape}-{args.layers}L" if args.layers else shape
        ckpt = make_checkpoint(shape)
        for job in args.jobs.split(","):
            print(f"{shape} {job} ...", flush=True)
            row = run_job(shape, job, ckpt, calib, tools)
            print(row, flush=True)
            rows = [r for r in rows if (r["shape"], r["job"]) != (shape, job)] + [row]
            write_json(ROWS, rows)
            save_results(RESULTS, report(rows, DEVICE_RUN))


if __name__ == "__main__":
    main()
