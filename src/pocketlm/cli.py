"""Command line: parses arguments, calls the library, prints. Nothing else lives here."""
from __future__ import annotations

import json
from pathlib import Path

import click

from . import cli_rag
from .cli_common import (
    DB,
    POSITIVE,
    SIZE,
    THREADS,
    IntList,
    OneLineErrors,
    check_files,
    deprecated,
    given,
    json_option,
    json_target,
    memory_options,
    qad_options,
    refuse_existing,
    terminate,
    user_errors,
    write_result,
)
from .errors import PocketError
from .models.registry import DEFAULT_MODEL
from .util.machine import usable_cores


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pocketlm")
def cli():
    """pocketlm: shrink a language model, measure what was kept, run it on your CPU."""


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@json_option
@user_errors
def info(model, as_json):
    """Architecture, parameters, tensor types and size of MODEL (folder, .gguf or name)."""
    from .models.info import inspect
    from .report_table import print_info

    d = inspect(model).to_dict()
    if json_target(as_json, None)[0]:
        click.echo(json.dumps(d, indent=2))
    else:
        print_info(d)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="out.gguf for a GGUF file; a folder path (no .gguf) for a Hugging Face folder.")
@click.option("--type", "dtype", default="f16", show_default=True, type=click.Choice(["f32", "f16", "bf16"]))
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def export(model, output, dtype, force, quiet):
    """Write MODEL as a GGUF file or a Hugging Face folder."""
    refuse_existing(output, force)
    if output.suffix.lower() == ".gguf":
        from .models.export_gguf import export_gguf

        export_gguf(model, output, dtype, progress=not quiet)
    else:
        from .models.export_hf import export_hf

        export_hf(model, output, dtype)
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", default=512, show_default=True, type=POSITIVE, help="Most tokens generated per answer.")
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(min=0))
@click.option("--ctx", default=2048, show_default=True, type=click.IntRange(min=16))
@THREADS
@user_errors
def chat(model, system, max_tokens, temperature, ctx, threads):
    """Chat with MODEL in the terminal, streamed, on llama.cpp. Empty line or Ctrl-D quits."""
    from .runtime.chat import chat_loop

    chat_loop(model, system=system, max_tokens=max_tokens, temperature=temperature, n_ctx=ctx, n_threads=threads or usable_cores())


@cli.command(name="eval")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--reference", "-r", default=None, help="Model to compare against (KLD, top-1).")
@click.option("--text", "texts", multiple=True, type=click.Path(path_type=Path), help="Text file(s) for PPL/KLD.")
@click.option("--text-tokens", type=POSITIVE, default=None, help="Use at most this many tokens of the text.")
@click.option("--max-tokens", "old_max_tokens", type=POSITIVE, default=None, hidden=True)  # the old name of --text-tokens
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=2), help="Window length in tokens.")
@click.option("--mmlu", type=click.Path(path_type=Path), default=None, help="MMLU jsonl file.")
@click.option("--mmlu-limit", type=POSITIVE, default=None, help="Subject-stratified sample size.")
@click.option("--speed", is_flag=True, help="Measure prefill/decode tok/s and peak memory.")
@THREADS
@click.option("--torch-dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="Precision for HF folders evaluated by torch.")
@json_option
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Write the results as JSON here.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@user_errors
def eval_cmd(model, reference, texts, text_tokens, old_max_tokens, ctx, mmlu, mmlu_limit, speed, threads, torch_dtype,
             as_json, output, force):
    """Perplexity, KL-divergence and top-1 vs a reference, MMLU, speed and size of MODEL."""
    from .eval.runner import EvalOptions, evaluate
    from .report_table import print_eval

    if old_max_tokens is not None:
        deprecated("eval --max-tokens", "--text-tokens (--max-tokens means tokens generated, in chat and ask)")
        text_tokens = text_tokens or old_max_tokens
    to_stdout, output = json_target(as_json, output)
    if output is not None:
        refuse_existing(output, force)  # before minutes of evaluation, not after
    opts = EvalOptions(texts=list(texts), reference=reference, max_tokens=text_tokens, ctx=ctx, mmlu=mmlu and str(mmlu),
                       mmlu_limit=mmlu_limit, speed=speed, threads=threads or usable_cores(), torch_dtype=torch_dtype,
                       progress=not to_stdout)
    result = evaluate(model, opts)
    if to_stdout:
        click.echo(json.dumps(result, indent=2))
    else:
        print_eval(result)
    if output is not None:
        write_result(output, result, force)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output .gguf file.")
@click.option("--type", "preset", default=None, help="llama.cpp preset: Q8_0, Q6_K, Q5_K_M, ..., Q2_K.")
@click.option("--target-size", type=SIZE, default=None, help="Instead of --type: the file size to fit, e.g. 60MB (types "
                                                              "per tensor chosen from measured sensitivity).")
@click.option("--target-bpw", type=click.FloatRange(1, 32), default=None,
              help="Instead of --type: bits per weight of the whole file.")
@memory_options
@click.option("--method", type=click.Choice(["rtn", "imatrix", "gptq", "qad"]), default=None,
              help="Default: gptq with --calib, else imatrix on bundled text. qad: gptq, then the file trained "
                   "against the original's logits in its own format.")
@qad_options
@click.option("--fisher", is_flag=True, help="gptq weighs each calibration token by how much the output distribution "
              "depends on each layer there (one backward pass of the whole model first; up to 1B parameters). "
              "With --method qad, training then runs end to end only.")
@click.option("--calib", multiple=True, type=click.Path(path_type=Path), help="Calibration text file(s).")
@click.option("--calib-tokens", default=8192, show_default=True, type=POSITIVE,
              help="Calibration tokens (8192 and 16384 gave the same KLD on SmolLM2 Q4_K_M).")
@click.option("--keep", multiple=True, help="PATTERN=TYPE per-tensor override, e.g. 'blk.*.ffn_down.weight=Q6_K'.")
@click.option("--allow-requant", is_flag=True, help="Allow a target type above the input's own quantization.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile and a model card beside the output.")
@click.option("--quiet", is_flag=True, help="No progress bars, no per-tensor table.")
@user_errors
def quantize(model, output, preset, target_size, target_bpw, target_memory, ctx, method, tokens, lr, qad_epochs, qad_codes,
             teacher, resume, fisher, calib, calib_tokens, keep, allow_requant, force, modelfile, quiet):
    """Quantize MODEL to a GGUF file that llama.cpp, Ollama and LM Studio run."""
    from .quantize.plan import PRESETS, parse_keep

    budgets = [b for b in (target_size, target_bpw, target_memory) if b is not None]
    if (preset is None) == (not budgets) or len(budgets) > 1:
        raise PocketError("give either --type PRESET or one budget (--target-size, --target-bpw or --target-memory), not both")
    if target_memory is not None:
        target_size = _memory_to_size(model, target_memory, ctx)
    if preset is not None and preset.upper() not in PRESETS:
        raise PocketError(f"unknown --type {preset!r} (choose one of {', '.join(PRESETS)})")
    if output.suffix.lower() != ".gguf":
        raise PocketError("the output of quantize is a .gguf file")
    if method != "qad" and (resume or teacher or given("tokens", "lr", "qad_codes", "qad_epochs")):
        raise PocketError("--tokens, --lr, --qad-epochs, --qad-codes, --teacher and --resume are for --method qad")
    refuse_existing(output, force)
    keep = parse_keep(keep)
    check_files(calib, "--calib")
    from .quantize.pipeline import QuantizeOptions, method_of, quantize_model
    from .report_table import print_quantize

    opts = QuantizeOptions(preset=preset.upper() if preset else None, method=method, calib=[str(c) for c in calib],
                           calib_tokens=calib_tokens, keep=keep, allow_requant=allow_requant, progress=not quiet,
                           fisher=fisher)
    if fisher:
        from .quantize.fisher import check

        check(model, method_of(opts))  # before the budget's sensitivity pass, which takes minutes
    if preset is None:
        opts.types = _budget_types(model, target_size, target_bpw, calib, calib_tokens, table=not quiet, progress=not quiet)
    if method == "qad":
        from .quantize.qad_options import QadOptions

        opts.qad = QadOptions(tokens=tokens, lr=lr, epochs=qad_epochs, codes=qad_codes, teacher=teacher, resume=resume,
                              progress=not quiet, say=click.echo)
    reports = quantize_model(model, output, opts)
    if not quiet:
        print_quantize(reports)
    click.echo(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    if modelfile:
        from .runtime.handoff import write_handoff

        how = [f"`pocketlm quantize` of {model}: " + (f"llama.cpp's {opts.preset} types" if opts.preset else
                                                     "types chosen per tensor for the budget")
               + f", {method_of(opts)} quantizer."]
        for path in write_handoff(output, f"{model}, quantized by pocketlm", how, tags=("quantized",)):
            click.echo(f"wrote {path}")
    if target_memory is not None:
        from .runtime.memory import check, verdict

        click.echo(verdict(check(output, *target_memory, ctx)))


def _memory_to_size(model, target_memory: tuple[int, str], ctx: int) -> int:
    from .runtime.memory import model_file_budget

    return model_file_budget(model, target_memory[0], ctx, target_memory[1])


def _budget_types(model, target_size, target_bpw, calib, calib_tokens, *, table: bool, progress: bool) -> dict[str, str]:
    """Every check that needs only the command line and the tensors' shapes comes before the
    measurement, which takes minutes on a cold cache."""
    from .quantize.budget import mb, smallest_file_bytes, target_bytes, types_for_budget

    if (target_size is None) == (target_bpw is None):
        raise PocketError("give one of --target-size or --target-bpw")
    smallest, n_params, exact = smallest_file_bytes(model)
    least = "" if exact else "at least "
    if target_size is not None and target_size < smallest:
        raise PocketError(f"--target-size {mb(target_size)} is below the smallest file this model quantizes to "
                          f"({least}{mb(smallest)}: every tensor at its smallest type); distill a smaller student first")
    if target_bpw is not None and target_bpw * n_params / 8 < smallest:
        raise PocketError(f"--target-bpw {target_bpw} is below the smallest file this model quantizes to "
                          f"({least}{smallest * 8 / n_params:.2f} bits per weight)")
    from .quantize.sensitivity import measure  # torch: only once the input is known to be good
    from .report_table import print_allocation

    sens = measure(model, [str(c) for c in calib], calib_tokens, progress=progress)
    target = target_bytes(sens, target_size, target_bpw)
    types = types_for_budget(sens, target)
    if table:
        print_allocation(sens, types, target)
    return types


@cli.command(name="plan")
@click.argument("model")
@click.option("--target-size", type=SIZE, default=None, help="File size to fit, e.g. 60MB or 57MiB.")
@click.option("--target-bpw", type=click.FloatRange(1, 32), default=None, help="Bits per weight of the whole file.")
@memory_options
@click.option("--calib", multiple=True, type=click.Path(path_type=Path), help="Calibration text file(s).")
@click.option("--calib-tokens", default=8192, show_default=True, type=POSITIVE)
@json_option
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Write the allocation (JSON) here.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@user_errors
def plan_cmd(model, target_size, target_bpw, target_memory, ctx, calib, calib_tokens, as_json, output, force):
    """Dry run of a budget: each tensor's type, the file size and the predicted KLD."""
    to_stdout, output = json_target(as_json, output)
    if sum(b is not None for b in (target_size, target_bpw, target_memory)) != 1:
        raise PocketError("give one of --target-size, --target-bpw or --target-memory")
    if output is not None:
        refuse_existing(output, force)
    check_files(calib, "--calib")
    if target_memory is not None:
        target_size = _memory_to_size(model, target_memory, ctx)
    from .compress.student import students_below_floor

    students = None if target_size is None else \
        students_below_floor(model, target_size, target_memory[0] if target_memory else None, ctx)
    if students is not None:  # quantization alone cannot reach it: show the students compress would weigh
        if not to_stdout:
            from .report_table import print_students

            print_students(students, target_size)
        if to_stdout:
            click.echo(json.dumps(students, indent=2))
        if output is not None:
            write_result(output, students, force)
        return
    types = _budget_types(model, target_size, target_bpw, calib, calib_tokens, table=not to_stdout, progress=True)
    if to_stdout:
        click.echo(json.dumps(types, indent=2))
    if output is not None:
        write_result(output, types, force)


@cli.command()
@click.argument("teacher")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output HF folder.")
@click.option("--data", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Training text: files or folders of documents (.txt .md .rst .html .pdf .docx).")
@click.option("--layers", type=POSITIVE, default=None, help="Keep the N most important layers.")
@click.option("--drop-layers", default=None, type=IntList(), help="Drop these layers, e.g. '3,7,12'.")
@click.option("--hidden", type=POSITIVE, default=None, help="Hidden size (default: aligned down to 256).")
@click.option("--ffn", type=POSITIVE, default=None, help="MLP width.")
@click.option("--heads", type=POSITIVE, default=None, help="Attention heads.")
@click.option("--kv-heads", type=POSITIVE, default=None, help="Key/value heads (= heads: plain multi-head).")
@click.option("--student", default=None, help="Start from this model instead of pruning the teacher.")
@click.option("--tokens", default=500_000, show_default=True, type=POSITIVE, help="Training tokens.")
@click.option("--seq", default=512, show_default=True, type=click.IntRange(min=2), help="Sequence length.")
@click.option("--loss", default="fkl", show_default=True, help="fkl | rkl | jsd:BETA | tvd | ce.")
@click.option("--tail", default="bucket", show_default=True, type=click.Choice(["bucket", "sample"]),
              help="fkl on the teacher's mass outside its top-k: one bucket, or also the data's next token there.")
@click.option("--targets", default="auto", show_default=True, type=click.Choice(["auto", "full", "sampled", "topk"]),
              help="The teacher's signal: its whole distribution computed beside the student (full), draws from it "
                   "cached once (sampled), or its cached top-k (topk). auto: full for teachers up to 1B parameters.")
@click.option("--ce-weight", default=None, type=click.FloatRange(min=0),
              help="Add this much of the data's cross-entropy to the divergence. Default: 1 with --loss fkl "
                   "(it measured better than fkl alone on held-out perplexity), 0 otherwise.")
@click.option("--hidden-weight", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Add this much of the final hidden state's cosine distance to the teacher's (needs --targets full).")
@click.option("--samples", default=12, show_default=True, type=POSITIVE, help="Draws per position (--targets sampled).")
@click.option("--topk", default=64, show_default=True, type=POSITIVE, help="Teacher log-probs kept per position (--targets topk).")
@click.option("--lr", default=3e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--batch", default=8, show_default=True, type=POSITIVE, help="Sequences per optimizer step (all processes).")
@click.option("--micro-batch", default=2, show_default=True, type=POSITIVE, help="Sequences per forward pass.")
@click.option("--eval-every", default=50, show_default=True, type=POSITIVE, help="Steps between held-out evaluations.")
@click.option("--save-every", default=50, show_default=True, type=POSITIVE, help="Steps between checkpoints.")
@click.option("--fp32", is_flag=True, help="Train in float32 instead of bf16 autocast.")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True,
              help="Continue the checkpoint an interrupted run left, or a finished OUTPUT with a larger --tokens.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@user_errors
def distill(teacher, output, data, layers, drop_layers, hidden, ffn, heads, kv_heads, student, tokens, seq, loss, tail,
            targets, ce_weight, hidden_weight, samples, topk, lr, batch, micro_batch, eval_every, save_every, fp32, seed,
            resume, force):
    """Prune TEACHER into a smaller student and heal it with knowledge distillation."""
    from .distill.loss_spec import check_targets, parse_loss

    # before torch is imported: a typo costs a fraction of a second
    check_targets(parse_loss(loss)[0], tail, targets, ce_weight, hidden_weight)
    check_files(data, "--data")
    from .distill.run import DistillOptions
    from .distill.run import distill as run_distill

    opts = DistillOptions(data=[str(d) for d in data], tokens=tokens, seq=seq, layers=layers,
                          drop_layers=drop_layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads,
                          student=student, loss=loss, tail=tail, targets=targets, samples=samples, topk=topk, lr=lr, ce_weight=ce_weight,
                          hidden_weight=hidden_weight, batch=batch, micro_batch=micro_batch,
                          eval_every=eval_every, save_every=save_every, bf16=not fp32, seed=seed, resume=resume,
                          force=force, say=click.echo)
    manifest = run_distill(teacher, output, opts)
    last = next((h for h in reversed(manifest["history"]) if "ppl" in h), None)
    if last:
        click.echo(f"held-out perplexity {last['ppl']:.3f}" + (f", KLD vs teacher {last['kld']:.4f}" if last.get("kld") else ""))
    click.echo(f"wrote {output} ({manifest['tokens']} tokens in {manifest['seconds']:.0f} s)")


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--target-size", type=SIZE, default=None, help="File size to fit, e.g. 80MB.")
@memory_options
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--domain", type=click.Path(path_type=Path), default=None, help="Documents to index for RAG.")
@click.option("--db", type=DB, default=None, help="Index --domain here (a file or postgresql://; default OUTPUT/docs.db).")
@click.option("--recipe", type=click.Path(path_type=Path), default=None, help="YAML recipe (see README).")
@click.option("--tokens", type=POSITIVE, default=None, help="Distillation tokens (overrides the recipe).")
@click.option("--mmlu", type=click.Path(path_type=Path), default=None, help="MMLU jsonl for a task-accuracy sample.")
@user_errors
def compress(model, target_size, target_memory, ctx, output, domain, db, recipe, tokens, mmlu):
    """The best model that fits a file size or a memory budget, evaluated against the original, with a report."""
    from .compress.pipeline import compress as run_compress

    if (target_size is None) == (target_memory is None):
        raise PocketError("give one of --target-size or --target-memory")
    if output.exists() and not output.is_dir():
        raise PocketError(f"{output} exists and is not a folder")
    run_compress(model, output, target_size=target_size, target_memory=target_memory, ctx=ctx, domain=domain,
                 recipe_path=recipe, tokens=tokens, mmlu=str(mmlu) if mmlu else None, db=db, say=click.echo)


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--db", type=DB, default=None, help="Index for RAG, embeddings and uploads (a file or postgresql://).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback: this machine only).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key", envvar="POCKETLM_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health (or POCKETLM_API_KEY).")
@click.option("--ctx", default=2048, show_default=True, type=click.IntRange(min=16),
              help="Context length of each generation context.")
@click.option("--parallel", default=None, type=POSITIVE,
              help="Requests served at once: llama-server slots, batched sequences or requests to --backend [16]; "
                   "contexts [1].")
@click.option("--engine", type=click.Choice(["auto", "server", "batched", "contexts"]), default="auto", show_default=True,
              help="server: llama.cpp's llama-server, supervised (auto: when setup built it, else batched); batched: "
                   "every request's next token in one decode; contexts: one llama.cpp context per request.")
@click.option("--kv-tokens", default=None, type=click.IntRange(min=0),
              help="llama-server's KV cache, shared by all slots: its memory, whatever --parallel [4 x --ctx]; a request "
                   "starts when its prompt + max_tokens fit in it. 0: a window per slot.")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(min=0), help="Requests that may wait; more get 429.")
@click.option("--uploads", type=click.Path(path_type=Path), default=None,
              help="Folder for uploaded documents (default: beside the index).")
@click.option("--max-upload-mb", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--backend", default=None, metavar="URL",
              help="Generate on this OpenAI-compatible server (llama-server, vLLM, Ollama...); MODEL then gives only "
                   "the vocabulary, for counting tokens.")
@click.option("--backend-key", envvar="POCKETLM_BACKEND_KEY", default=None, help="The backend's API key.")
@click.option("--backend-model", default=None, help="The backend's model id [default: the first it lists].")
@THREADS
@user_errors
def serve(model, db, host, port, api_key, ctx, parallel, kv_tokens, max_queue, uploads, max_upload_mb, engine, backend,
          backend_key, backend_model, threads):
    """OpenAI-compatible API (+ RAG with citations) and a web page, on llama.cpp or any OpenAI-compatible backend."""
    import uvicorn

    from .serve.app import create_app
    from .serve.engine import make_pool
    from .serve.http import HeaderDeadlineProtocol
    from .serve.knowledge import KnowledgeBase

    if backend is None and (backend_key or backend_model):
        raise PocketError("--backend-key and --backend-model are for --backend")
    if backend is not None and (engine != "auto" or kv_tokens is not None):
        raise PocketError("--engine and --kv-tokens are how llama.cpp runs here; with --backend the backend generates")
    kb = KnowledgeBase(db, uploads) if db else None
    pool = make_pool(model, engine=engine, backend=backend, backend_key=backend_key, backend_model=backend_model, ctx=ctx,
                     parallel=parallel, max_queue=max_queue, threads=threads, kv_tokens=kv_tokens, say=click.echo)
    model_id = Path(model).stem if Path(model).exists() else model
    app = create_app(pool, model_id, kb, api_key=api_key, max_upload_mb=max_upload_mb)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    click.echo(f"pocketlm: {model_id} on http://{host}:{port}/ (OpenAI base URL http://{host}:{port}/v1)")
    uvicorn.run(app, host=host, port=port, log_level="warning", http=HeaderDeadlineProtocol)


for command in (cli_rag.index, cli_rag.search, cli_rag.ask):
    cli.add_command(command)


def main():
    import signal

    signal.signal(signal.SIGTERM, terminate)
    cli()


if __name__ == "__main__":
    main()
