"""Load on `pocketlm serve`: p50/p95 latency, time to first token, total tokens/s, refusals and
the server's peak memory at 1, 4, 16 and 64 concurrent clients, each sending streamed chat
requests, for each engine: --parallel 1 and 2 llama.cpp contexts, --engine batched, and the
`--backend` front over a batched server (the front's own cost).

Each server runs as its own process (`pocketlm serve`, the default model), so the clients'
Python does not share its interpreter; all share the machine's cores, as they would on a laptop.

  .venv/bin/python bench/serve_load.py [--requests 5] [--max-tokens 64] [--clients 1,4,16,64]
      [--configs contexts-1,contexts-2,batched-16,front-over-batched-16,llama-server-16,front-over-llama-server-16,
      front-paired-16] [--rounds 6]

Results: bench/results/serve_load.md (and stdout).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from results_file import save_results  # noqa: E402

from pocketlm.util.machine import cpu_name  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "serve_load.md"
WORK = Path(os.environ.get("POCKETLM_BENCH_CACHE", Path.home() / ".cache" / "pocketlm-bench")) / "serve_load"
QUESTIONS = ["Explain what a compiler does.", "Write a short poem about rain.", "Give three tips for learning to cook.",
             "What is the difference between a list and a tuple?", "Describe a sunset over the sea."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = {  # name: (server arguments, or "llama-server"; a second server in front of it with --backend)
    "contexts-1": (["--engine", "contexts", "--parallel", "1"], False),
    "contexts-2": (["--engine", "contexts", "--parallel", "2"], False),
    "server-16": (["--engine", "server", "--parallel", "16"], False),  # the default: pocketlm's supervised llama-server
    "server-16-window": (["--engine", "server", "--parallel", "16", "--kv-tokens", "0"], False),  # a KV window per slot
    "server-4": (["--engine", "server", "--parallel", "4"], False),  # memory against slots, the KV pool shared
    "server-64": (["--engine", "server", "--parallel", "64"], False),
    "batched-16": (["--engine", "batched", "--parallel", "16"], False),
    "front-over-batched-16": (["--engine", "batched", "--parallel", "16"], True),
    "llama-server-16": ("llama-server", False),  # the anchor: llama.cpp's own server, 16 slots
    "front-over-llama-server-16": ("llama-server", True),
    # the front's cost measured paired: one llama-server, 16 clients straight to it and through a front
    # over it, alternating (ABBA) for --rounds rounds; unpaired configs differ by ~7% run to run here
    "front-paired-16": ("llama-server", True),
    # the llama-server setup builds for serve (llama.cpp plus scripts/llama.cpp-patches), bare: the
    # anchor for what the front and the shared KV pool cost on the engine serve actually runs
    "llama-server-16-patched": ("llama-server-patched", False),
    "front-paired-16-patched": ("llama-server-patched", True),
    # sampling: llama-server samples each slot's next token on its main thread, one slot after another,
    # while the compute threads wait. -chain: only the samplers the OpenAI API can set (the rest are
    # no-ops at their defaults); -bs: that chain inside the decode's graph, on the compute threads
    # (llama.cpp's --backend-sampling; DRY, XTC, typical and top-n-sigma have no backend form)
    "llama-server-16-patched-chain": ("llama-server-patched-chain", False),
    "llama-server-16-patched-bs": ("llama-server-patched-bs", False),
    # what serve's default engine (the supervised patched llama-server, its slots sharing one KV pool,
    # behind serve's own front) costs against that binary bare (a window per slot), paired the same way
    "engine-paired-16": ("llama-server-patched", ["--engine", "server", "--parallel", "16"]),
}


def model_path(model: str | None) -> str:
    from pocketlm.models.registry import DEFAULT_MODEL
    from pocketlm.models.source import resolve

    return str(resolve(model or DEFAULT_MODEL).path)


API_CHAIN = ["--samplers", "penalties;top_k;top_p;min_p;temperature"]
SAMPLING = {"chain": API_CHAIN, "bs": [*API_CHAIN, "--backend-sampling"]}


def llama_server_command(port: int, model: str | None, variant: str = "llama-server") -> list[str]:
    """llama.cpp's server on the model, 16 slots of 2048 tokens (its -c is the total), 2 threads;
    built by bench/build_llamacpp_tools.sh with TOOLS_SERVER=1, or (variant llama-server-patched) the
    one setup built for `pocketlm serve`; a variant's last word may name SAMPLING's extra flags."""
    if variant.startswith("llama-server-patched"):
        from pocketlm.serve.supervise import find_llama_server

        binary = find_llama_server()
        if binary is None:
            sys.exit("error: setup built no llama-server here")
    else:
        tools = subprocess.run(["bash", str(ROOT / "bench" / "build_llamacpp_tools.sh")], capture_output=True,
                               text=True, check=True, env={**os.environ, "TOOLS_SERVER": "1"}).stdout.strip()
        binary = Path(tools.splitlines()[-1]) / "llama-server"
    return [str(binary), "-m", model_path(model), "--host", "127.0.0.1", "--port",
            str(port), "-np", "16", "-c", str(16 * 2048), "-t", "2", *SAMPLING.get(variant.rsplit("-", 1)[-1], [])]


def start_server(args, model: str | None = None) -> tuple[subprocess.Popen, str]:
    WORK.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = llama_server_command(port, model, args) if isinstance(args, str) else \
        [str(ROOT / ".venv" / "bin" / "pocketlm"), "serve", *([model] if model else []), "--port", str(port),
         "--max-queue", "32", *args]
    # stderr to a file, never a pipe nobody reads: llama-server logs every request there, and once a
    # pipe's 64 KB filled it blocked mid-write and stalled under 64 clients (runs of 2026-12-01)
    log = open(WORK / f"server-{port}.log", "wb")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"server did not start: {(WORK / f'server-{port}.log').read_text(errors='replace')[-2000:]}")


STALL = 120.0  # seconds without a byte from the server: the request is counted as stalled


def one_request(url: str, question: str, max_tokens: int) -> dict:
    body = {"model": "x", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, pieces = None, 0, 0
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=STALL) as res:
            if res.status_code == 429:
                return {"status": 429}
            if res.status_code != 200:
                return {"status": res.status_code}
            for line in res.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    pieces += 1
                    if first is None:
                        first = time.perf_counter() - t0
    except httpx.TimeoutException:
        return {"status": "stalled"}  # nothing for STALL seconds: counted, not waited on forever
    except httpx.HTTPError:
        return {"status": "error"}
    tokens = tokens or pieces  # a server that reports no usage streams one token a piece
    return {"status": 200, "latency": time.perf_counter() - t0, "ttft": first or 0.0, "tokens": tokens}


class PeakMemory:
    """Peak resident memory of the server processes (and their children), sampled in a thread."""

    def __init__(self, pids: list[int]):
        import threading

        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.peak, self._stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in self.procs:
                try:
                    total += sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def stop(self) -> int:
        self._stop.set()
        self.thread.join(5)
        return self.peak


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client(i):
        return [one_request(url, QUESTIONS[(i + j) % len(QUESTIONS)], max_tokens) for j in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        results = [r for rs in ex.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    other = [r for r in results if r["status"] not in (200, 429)]
    lat, ttft = [r["latency"] for r in ok] or [float("nan")], [r["ttft"] for r in ok] or [float("nan")]
    return {"clients": clients, "ok": len(ok), "refused": len(results) - len(ok) - len(other), "other": len(other),
            "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95), "ttft50": np.percentile(ttft, 50),
            "ttft95": np.percentile(ttft, 95), "tok_s": sum(r["tokens"] for r in ok) / wall, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=6, help="front-paired-16: rounds of llama-server alone and the front")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--model", help="a GGUF file (or model name) instead of the default model: its rows are kept apart, "
                                    "as 'CONFIG @ FILE-STEM', and no goal reads them")
    ap.add_argument("--note", default="", help="a line under the table, kept for later runs (what a run showed that "
                                                "no row holds)")
    ap.add_argument("--write-only", action="store_true", help="rewrite the results from the kept rows, run nothing")
    args = ap.parse_args()
    if args.note:
        WORK.mkdir(parents=True, exist_ok=True)
        with open(WORK / "notes.txt", "a") as f:
            f.write(args.note.replace("\n", " ") + "\n")
    if args.write_only:
        write(remember([]), args)
        return
    rows = []
    for name in args.configs.split(","):
        server_args, front = CONFIGS[name]
        label = f"{name} @ {Path(args.model).stem}" if args.model else name
        if "-paired-" in name:
            rows += paired(label, args, server_args, front if isinstance(front, list) else None)
            continue
        procs = []
        try:
            proc, url = start_server(server_args, args.model)
            procs.append(proc)
            if front:
                proc, url = start_server(["--backend", url, "--parallel", "16"])
                procs.append(proc)
            one_request(url, "warm up", 4)
            # every slot's connection made and the engine's batch sizes seen once before anything is
            # timed: without it the first config of a run read up to 25% low (2026-12-04)
            run_level(url, min(16, max(map(int, args.clients.split(",")))), 1, args.max_tokens)
            for clients in map(int, args.clients.split(",")):
                rows.append(measured_level(url, clients, procs, args, label))
            alive = httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
        finally:
            stop(procs)
        if not alive:
            sys.exit(f"the server went down under load ({name})")
    write(remember(rows), args)


def measured_level(url: str, clients: int, procs: list[subprocess.Popen], args, config: str) -> dict:
    """One level of load, with the peak memory of the server processes `procs` over it."""
    memory = PeakMemory([p.pid for p in procs])
    row = run_level(url, clients, args.requests, args.max_tokens) | {"config": config}
    row["rss_mb"] = memory.stop() / 2**20
    print(row, flush=True)
    return row


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # llama-server stalled under 64 clients ignored SIGTERM
            proc.kill()
            proc.wait(30)


def paired(label: str, args, server: str, other: list[str] | None = None) -> list[dict]:
    """16 clients on llama-server alone and, alternating, through the front over that same server,
    or with `other`, on a second server of those serve arguments beside it (idle while the first runs)."""
    procs: list[subprocess.Popen] = []
    rows = []
    try:
        proc, direct = start_server(server, args.model)
        procs.append(proc)
        proc, second = start_server(other or ["--backend", direct, "--parallel", "16"], args.model if other else None)
        procs.append(proc)
        for url in (direct, second):
            one_request(url, "warm up", 4)
            run_level(url, 16, 1, args.max_tokens)  # every slot's connection made before anything is timed
        for i in range(args.rounds):
            order = [(direct, "llama-server", procs[:1]),
                     (second, "serve", procs[1:]) if other else (second, "front", procs)]
            for url, tag, measured in order if i % 2 == 0 else order[::-1]:
                rows.append(measured_level(url, 16, measured, args, f"{label} ({tag})"))
    finally:
        stop(procs)
    return rows


# the table's columns: (row key, heading, format); write() prints them, committed_rows() reads them back
COLUMNS = [("config", "engine", "s"), ("clients", "clients", "d"), ("ok", "ok", "d"), ("refused", "429", "d"),
           ("other", "stalled or failed", "d"), ("p50", "p50 latency s", ".2f"), ("p95", "p95 latency s", ".2f"),
           ("ttft50", "TTFT p50 s", ".2f"), ("ttft95", "TTFT p95 s", ".2f"), ("tok_s", "total tok/s", ".1f"),
           ("rss_mb", "server peak RSS MB", ".0f"), ("when", "run", "s")]
DEFAULTS = {"other": 0, "when": ""}  # rows kept before these columns existed


def remember(rows: list[dict]) -> list[dict]:
    """This run's rows with the other configs' rows of earlier runs (kept in the bench cache, each
    marked with its date), in CONFIGS order: one table even when a config is rerun alone."""
    WORK.mkdir(parents=True, exist_ok=True)
    saved = json.loads((WORK / "rows.json").read_text()) if (WORK / "rows.json").exists() else committed_rows()
    today = f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu_name()}"
    for r in rows:
        r["when"] = today
    fresh = {r["config"] for r in rows}
    saved = {k: v for k, v in saved.items() if k not in fresh} | {c: [r for r in rows if r["config"] == c] for c in fresh}
    (WORK / "rows.json").write_text(json.dumps(saved, indent=1, default=float))
    return [r for c in CONFIGS for k in sorted(saved) if k == c or k.startswith((f"{c} @ ", f"{c} (")) for r in saved[k]]


def committed_rows() -> dict[str, list[dict]]:
    """The rows of the committed table, for a machine whose bench cache is gone (a fresh clone):
    without them a rerun of one config would rewrite the table with that config alone."""
    if not RESULTS.exists():
        return {}
    text = RESULTS.read_text()
    if not (WORK / "notes.txt").exists() and "\n\n- " in text:  # the notes: the last block of the file
        (WORK / "notes.txt").write_text("".join(n[2:] + "\n" for n in text.rsplit("\n\n", 1)[1].splitlines()))
    saved: dict[str, list[dict]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(COLUMNS) or not cells[1].isdigit():
            continue
        row = {key: float(cell) if "f" in fmt else int(cell) if fmt == "d" else cell
               for (key, _, fmt), cell in zip(COLUMNS, cells)}
        saved.setdefault(row["config"], []).append(row)
    return saved


def goals(rows: list[dict]) -> list[str]:
    by = {(r["config"], r["clients"]): r for r in rows}
    out = ["", "Goals (the default engine, server-16, against llama-server alone):"]
    one, sixteen, anchor = by.get(("server-16", 1)), by.get(("server-16", 16)), by.get(("llama-server-16", 16))
    if not (one and sixteen and anchor):
        return out + ["- not measured: run the server-16 and llama-server-16 configs"]
    front = by.get(("front-over-llama-server-16", 16))
    crowd = by.get(("server-16", 64))

    def said(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    def runs(other: dict) -> str:
        """Said where a ratio's two rows come from different runs (this host's run-to-run spread is ~30%)."""
        if other.get("when") == sixteen.get("when"):
            return ""
        return f" [rows of different runs: {sixteen.get('when')} and {other.get('when')}]"

    out += [f"- 16 clients >= 3x one client's tok/s: {sixteen['tok_s']:.0f} vs {one['tok_s']:.0f} "
            f"({sixteen['tok_s'] / one['tok_s']:.2f}x) -> {said(sixteen['tok_s'] >= 3 * one['tok_s'])}",
            f"- 16 clients >= 0.9x llama-server alone (stock llama.cpp, llama-server-16): {sixteen['tok_s']:.0f} vs "
            f"{anchor['tok_s']:.0f} "
            f"({sixteen['tok_s'] / anchor['tok_s']:.2f}x) -> {said(sixteen['tok_s'] >= 0.9 * anchor['tok_s'])}{runs(anchor)}",
            f"- TTFT p50 <= 1 s at 16 clients: {sixteen['ttft50']:.2f} s -> {said(sixteen['ttft50'] <= 1)}"]
    flat = [by.get((f"server-{n}", 1)) for n in (4, 16, 64)]
    if all(flat):
        rss = [r["rss_mb"] for r in flat]
        out.append(f"- memory flat in slots (shared KV pool, 4 x 2048 tokens): peak RSS with 4 / 16 / 64 slots at one "
                   f"client {' / '.join(f'{m:.0f}' for m in rss)} MB (spread {max(rss) / min(rss) - 1:.0%}) -> "
                   f"{said(max(rss) <= 1.1 * min(rss))}")
    if crowd:
        clean = not crowd.get("other", 0)
        out.append(f"- 64 clients: {crowd['ok']} answers, {crowd['refused']} clean 429s, {crowd.get('other', 0)} stalled "
                   f"or failed; the server answered /health afterwards -> {said(clean)}")
    patched = by.get(("llama-server-16-patched", 16))
    if patched:
        out.append(f"- 16 clients >= 0.9x the same llama-server binary alone (llama-server-16-patched: serve's own "
                   f"engine, bare): {sixteen['tok_s']:.0f} vs {patched['tok_s']:.0f} "
                   f"({sixteen['tok_s'] / patched['tok_s']:.2f}x) -> {said(sixteen['tok_s'] >= 0.9 * patched['tok_s'])}"
                   f"{runs(patched)}")
    for config in ("front-paired-16", "front-paired-16-patched"):
        pairs = list(zip(*([r for r in rows if r["config"] == f"{config} ({tag})"] for tag in ("llama-server", "front"))))
        if pairs:
            costs = sorted(1 - f["tok_s"] / d["tok_s"] for d, f in pairs)
            median = costs[len(costs) // 2]
            out.append(f"- the --backend front costs <= 5% of llama-server's tok/s at 16 clients, paired ({config}: "
                       f"{len(pairs)} rounds): costs {', '.join(f'{c:+.1%}' for c in costs)}, median {median:+.1%} -> "
                       f"{said(median <= 0.05)}")
    pairs = list(zip(*([r for r in rows if r["config"] == f"engine-paired-16 ({tag})"] for tag in ("llama-server", "serve"))))
    if pairs:
        ratios = sorted(s["tok_s"] / d["tok_s"] for d, s in pairs)
        out.append(f"- serve's engine (server-16: KV pool + front) against the same binary bare, paired (engine-paired-16: "
                   f"{len(pairs)} rounds): {', '.join(f'{r:.2f}x' for r in ratios)}, median {ratios[len(ratios) // 2]:.2f}x")
    if front and front.get("when") != anchor.get("when"):
        out.append(f"- the --backend front, unpaired (front-over-llama-server-16): its rows ({front.get('when')}) and "
                   f"llama-server-16's ({anchor.get('when')}) come from different runs: not compared")
    elif front:
        out.append(f"- the --backend front costs <= 5% of llama-server's tok/s at 16 clients, unpaired (two configs, "
                   f"each its own llama-server): {front['tok_s']:.0f} vs "
                   f"{anchor['tok_s']:.0f} ({1 - front['tok_s'] / anchor['tok_s']:+.1%} cost) -> "
                   f"{said(front['tok_s'] >= 0.95 * anchor['tok_s'])}")
    return out


def write(rows, args) -> None:
    lines = ["# `pocketlm serve` under load", "",
             "Command: `.venv/bin/python bench/serve_load.py` on 2 cores; each row's run (date, and the machine where "
             "it was recorded; rows without one ran on AMD EPYC, AVX-512) in its last column. "
             "Default model (SmolLM2-135M-Instruct Q4_1) on llama.cpp (rows 'CONFIG @ FILE': "
             "that file, `--model FILE`), "
             f"{args.requests} streamed chat requests per client, greedy, max_tokens {args.max_tokens}, "
             "--max-queue 32; clients and servers share the 2 cores. Engines: server-N = the default, `--engine server "
             "--parallel N` (pocketlm's supervised llama-server, its KV cache one pool of 4 x 2048 tokens shared by the "
             "slots); server-16-window = the same with `--kv-tokens 0` (a 2048-token window per slot, the engine before "
             "the pool); contexts-N = `--parallel N` llama.cpp contexts"
             "; batched-16 = `--engine batched --parallel 16`; front-over-batched-16 = a second `pocketlm serve "
             "--backend URL` in front of batched-16 (memory: both processes); llama-server-16 = llama.cpp's own server (the same "
             "llama.cpp as llama-cpp-python's), 16 slots of 2048 tokens, 2 threads, and the front over it; "
             "front-paired-16 = one llama-server, 16 clients straight to it and through the front over it, "
             "alternating in rounds (the front's memory row: both processes); '-patched' rows: the same with the "
             "llama-server setup builds for serve (llama.cpp plus scripts/llama.cpp-patches) instead of stock llama.cpp's.",
             "",
             "| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(format(r.get(k, DEFAULTS.get(k)), fmt) for k, _, fmt in COLUMNS) + " |" for r in rows]
    notes = (WORK / "notes.txt").read_text().splitlines() if (WORK / "notes.txt").exists() else []
    lines += goals(rows) + ([""] + [f"- {n}" for n in notes] if notes else [])
    text = "\n".join(lines) + "\n"
    print(text)
    save_results(RESULTS, text)


if __name__ == "__main__":
    main()
