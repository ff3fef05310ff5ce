"""`pocketlm compress`: the best model that fits a size budget, and a report of what it kept.

plan (sensitivity of the original; distill or not, and why) -> distill (optional) -> quantize
to the budget -> llama.cpp's own preset of the original at the nearest size -> evaluate all
three against the original -> report -> index of the domain documents (optional). Each step
is resumable (manifest.py); a rerun with the same inputs only re-renders the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..data import SAMPLE_DOCS, general_text
from ..errors import PocketError
from ..models.source import resolve
from ..quantize.budget import mb, parse_size, types_for_budget
from ..quantize.plan import tensor_bytes
from ..util.atomic import write_json
from ..util.cache import model_content_hash
from ..util.hashing import file_sha256, tree_sha256
from .manifest import Manifest, key_of
from .recipe import load_recipe
from .student import choose_student

EVAL_PAGE = "programming.rst"  # the bundled page we report on; calibration never sees it


def default_texts() -> tuple[list[str], list[str]]:
    pages = sorted(p for p in SAMPLE_DOCS.glob("*.rst") if "LICENSE" not in p.name)
    return [str(p) for p in pages if p.name != EVAL_PAGE], [str(SAMPLE_DOCS / EVAL_PAGE)]


def _hash_files(paths) -> list[str]:
    return [tree_sha256(p) if Path(p).is_dir() else file_sha256(p) for p in paths]


def compress(model: str, out: str | Path, *, target_size: str | int | None = None,
             target_memory: str | tuple[int, str] | None = None, ctx: int = 4096, domain: str | Path | None = None,
             recipe_path: str | Path | None = None, tokens: int | None = None, mmlu: str | None = None,
             db: str | Path | None = None, progress: bool = True, say: Callable[[str], None] = print) -> dict:
    """The best model that fits `target_size` (file bytes) or `target_memory` (what llama.cpp
    takes running it at a context of `ctx`: weights + KV cache + buffers, runtime/memory.py)."""
    from ..runtime.memory import model_file_budget, parse_memory

    if (target_size is None) == (target_memory is None):
        raise PocketError("give one of --target-size or --target-memory")
    recipe = load_recipe(recipe_path, **{"distill.tokens": tokens, "evaluate.mmlu": mmlu})
    src = resolve(model)
    memory = None
    if target_memory is not None:
        memory, memory_label = target_memory if isinstance(target_memory, tuple) else parse_memory(target_memory)

    def budget_of(path) -> int:
        """The file budget of a model to quantize: the size given, or what the memory leaves it."""
        if memory is None:
            return target_size if isinstance(target_size, int) else parse_size(str(target_size))
        return model_file_budget(path, memory, ctx, memory_label)

    budget = budget_of(src.path)  # the original's; a student's own KV cache gives it its own
    calib_default, eval_default = default_texts()
    calib = [str(p) for p in recipe["quantize"]["calib"]] or calib_default
    texts = [str(p) for p in recipe["evaluate"]["texts"]] or eval_default
    for path in calib + texts + [str(p) for p in recipe["distill"]["data"]]:
        if not Path(path).exists():
            raise PocketError(f"no such file or folder: {path}")
    if domain is not None:
        from ..rag.loaders import find_documents

        if not find_documents([domain]):
            raise PocketError(f"{domain} has no documents pocketlm can read (.txt .md .rst .html .pdf .docx)")
        if db is not None:  # a database that cannot be reached is said now, not after the hours before the index
            from ..rag.store import open_store

            open_store(db, create=True).close()
    elif db is not None:
        raise PocketError("--db names where --domain's documents are indexed; give --domain too")
    d = recipe["distill"]
    if d["when"] != "never" and not d["fraction"]:
        from ..quantize.budget import smallest_file_bytes

        if d["when"] == "always" or budget < smallest_file_bytes(src)[0]:
            from ..distill.choose import student_candidates
            from .student import teacher_facts

            teacher, overhead = teacher_facts(src)
            student_candidates(teacher, overhead, memory or budget, ctx if memory else None)  # said now, not after the plan
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out)
    src_hash = model_content_hash(src)
    calib_hashes = _hash_files(calib)
    q = recipe["quantize"]
    if q["fisher"]:  # the original's size is refused now; a student of it is smaller
        from ..quantize.fisher import check

        check(src.path, q["method"])

    def make_plan(path: Path) -> dict:
        from ..quantize.sensitivity import measure

        sens = measure(src.path, calib, q["calib_tokens"], progress)
        smallest = sens.file_bytes({n: min(i["errors"], key=lambda t: tensor_bytes(t, i["shape"]))
                                    for n, i in sens.tensors.items()})
        when = recipe["distill"]["when"]
        if when == "always":
            decision = {"distill": True, "why": "the recipe asks for distillation (distill.when: always)"}
        elif budget >= smallest:
            predicted = sens.predicted_kld(types_for_budget(sens, budget))
            decision = {"distill": False, "predicted_kld": predicted,
                        "why": f"quantization alone reaches {mb(budget)} (the smallest file for this model is "
                               f"{mb(smallest)}) with a predicted KLD of {predicted:.3f}, far less than a short "
                               "distillation loses (SmolLM2-135M healed on 200k tokens kept a KLD of ~1.3 to its "
                               "teacher: bench/results/distill.md), so distillation was skipped"}
        elif when == "never":
            raise PocketError(f"{mb(budget)} is below the smallest file this model quantizes to ({mb(smallest)}) and "
                              "the recipe forbids distillation")
        else:
            decision = {"distill": True,
                        "why": f"{mb(budget)} is below the smallest file quantization alone can make of this model "
                               f"({mb(smallest)}): a smaller student is distilled first"}
        decision.update(budget=budget, smallest=smallest, n_params=sens.n_params)
        write_json(path, decision)
        return decision

    plan = manifest.run("plan", key_of("plan", src_hash, budget, recipe["distill"], q, calib_hashes), "plan.json", make_plan,
                        params={"budget": budget, "distill": recipe["distill"]}, say=say)["result"]
    say(f"decision: {plan['why']}")

    quant_source, quant_hash = src.path, src_hash
    choice = None
    # what the student is distilled on and a file trained on (qad): general text keeps the model
    # general; the domain documents, when given, make it at home in them too (what the index holds)
    data = [str(p) for p in d["data"]] or general_text() + ([str(domain)] if domain is not None else [])
    if plan["distill"]:
        shape_opts: dict = {"fraction": d["fraction"]} if d["fraction"] else {}
        if not shape_opts:
            # the pilots' length is their own: a longer final run (--tokens) keeps the same choice
            pilot_d = {k: v for k, v in d.items() if k != "tokens"}
            choose_key = key_of("choose", src_hash, budget, memory, ctx, pilot_d, q, calib_hashes, _hash_files(data))
            choice = manifest.run("choose", choose_key,
                                  "choose", lambda path: choose_student(src, path, memory or budget, data, d, q, calib,
                                                                        progress, say, ctx if memory else None, choose_key),
                                  params={"budget": budget, "pilot_tokens": d["pilot_tokens"]}, say=say)["result"]
            say(f"student: {choice['why']}")
            shape_opts = choice["shape"]

        def make_student(path: Path) -> dict:
            from ..distill.run import DistillOptions, distill
            from ..distill.stages import distill_iteratively

            opts = DistillOptions(data=data, tokens=d["tokens"], loss=d["loss"], targets=d["targets"],
                                  ce_weight=d["ce_weight"], hidden_weight=d["hidden_weight"], **shape_opts, resume=True,
                                  force=True, progress=progress, say=say, eval_every=10**9, save_every=25)
            if _iterative(src, d["iterative"], shape_opts):
                say("deep cut: pruned and healed in two stages (distill/stages.py)")
                result = distill_iteratively(src.path, path, opts, shape_opts)
            else:
                result = distill(src.path, path, opts)
            return {"tokens": result["tokens"], "shape": result["shape"], "stages": result.get("stages", []),
                    **shape_opts}

        manifest.run("distill", key_of("distill", src_hash, d, shape_opts, _hash_files(data)), "student", make_student,
                     params={**d, **shape_opts}, say=say)
        quant_source, quant_hash = out / "student", tree_sha256(out / "student")

    quant_budget = budget_of(quant_source)

    def make_model(path: Path) -> dict:
        from ..quantize.pipeline import QuantizeOptions, quantize_model
        from ..quantize.sensitivity import measure

        sens = measure(quant_source, calib, q["calib_tokens"], progress)
        types = types_for_budget(sens, quant_budget)
        quantize_model(str(quant_source), path, QuantizeOptions(types=types, method=q["method"], calib=calib,
                                                                calib_tokens=q["calib_tokens"], progress=progress,
                                                                fisher=q["fisher"]))
        kinds = {n: sens.loss(n, t) for n, t in types.items()}
        result = {"types": types, "predicted_kld": sens.predicted_kld(types), "loss": kinds, "size": path.stat().st_size}
        if memory is not None:
            from ..runtime.memory import check, verdict

            checked = check(path, memory, memory_label, ctx)
            say(verdict(checked))
            result["memory"] = checked
        return result

    use_qad, qad_why = qad_applies(q["qad"], quant_source, quant_budget)
    first = "model-gptq.gguf" if use_qad else "model.gguf"  # with qad, the file it starts from is kept beside
    quantized = manifest.run("quantize", key_of("quantize", quant_hash, quant_budget, memory, ctx, q, calib_hashes, use_qad),
                             first, make_model, params={"budget": quant_budget, **q}, say=say)["result"]
    if use_qad:
        say(f"qad: {qad_why}")

        def make_qad(path: Path) -> dict:
            from ..quantize.qad import train_file
            from ..quantize.qad_options import QadOptions

            r = train_file(src.path, out / first, path, data, QadOptions(tokens=q["qad_tokens"], epochs=q["qad_epochs"],
                                                                             progress=progress, resume=True, say=say),
                           ckpt_folder=out / "qad.ckpt", student_source=None if quant_source == src.path else quant_source,
                           weighted_start=q["fisher"])
            return {"tokens": r["tokens"], "epochs": r["epochs"], "seconds": r["seconds"], "kld_before": r["start"]["kld"],
                    "kld_after": r["end"]["kld"], "max_difference": r["max_difference"], "why": qad_why,
                    "kept_start": r["kept_start"]}

        qad = manifest.run("qad", key_of("qad", src_hash, file_sha256(out / first), q["qad_tokens"], q["qad_epochs"],
                                         _hash_files(data)),
                           "model.gguf", make_qad, params={"tokens": q["qad_tokens"], "epochs": q["qad_epochs"]},
                           say=say)["result"]
        quantized = {**quantized, "qad": qad}

    ev = recipe["evaluate"]
    preset = None
    if ev["compare_preset"]:
        preset = nearest_preset(src, budget)

        def make_preset(path: Path) -> dict:
            from ..models.export_gguf import cached_gguf
            from ..quantize.llamacpp_reference import llamacpp_quantize

            llamacpp_quantize(cached_gguf(src, "f32"), path, preset, allow_requantize=True)
            return {"preset": preset, "size": path.stat().st_size}

        manifest.run("preset", key_of("preset", src_hash, preset), f"llamacpp-{preset}.gguf", make_preset,
                     params={"preset": preset}, say=say)

    def make_eval(path: Path) -> dict:
        from ..eval.report import STUDENT_ROW
        from ..eval.runner import EvalOptions, evaluate

        base = dict(texts=texts, max_tokens=ev["max_tokens"], ctx=ev["ctx"], speed=ev["speed"], mmlu=ev["mmlu"],
                    mmlu_limit=ev["mmlu_limit"], progress=progress)
        rows = {"original": evaluate(str(src.path), EvalOptions(**base))}
        rows["pocketlm"] = evaluate(str(out / "model.gguf"), EvalOptions(**base, reference=str(src.path)))
        if use_qad:
            rows["pocketlm before qad"] = evaluate(str(out / first), EvalOptions(**base, reference=str(src.path)))
        if plan["distill"]:
            # the float student on the same text splits the file's divergence into what distillation
            # lost and what quantization added, which say where more tokens would go (text only: its
            # torch speed says nothing about the file's)
            rows[STUDENT_ROW] = evaluate(str(out / "student"), EvalOptions(**{**base, "speed": False, "mmlu": None},
                                                                           reference=str(src.path)))
        if preset:
            rows[f"llama.cpp {preset}"] = evaluate(str(out / f"llamacpp-{preset}.gguf"),
                                                   EvalOptions(**base, reference=str(src.path)))
        write_json(path, rows)
        return {"rows": list(rows)}

    model_hash = file_sha256(out / "model.gguf")
    manifest.run("evaluate", key_of("evaluate", src_hash, model_hash, preset, ev, _hash_files(texts), use_qad, quant_hash),
                 "eval.json",
                 make_eval,
                 params=ev, say=say)

    from ..eval.report import write_report

    report = write_report(out, src, plan, quantized, preset, choice)
    from ..runtime.handoff import write_handoff

    how = [f"`pocketlm compress` of {src.name}: {report['headline']}", *report["notes"],
           "The whole report, with plots: report.md / report.html."]
    tags = ("quantized", *(("distilled",) if plan["distill"] else ()), *(("qat",) if use_qad else ()))
    modelfile, _ = write_handoff(out / "model.gguf", f"{src.name}, compressed by pocketlm", how, report["table"], tags=tags,
                                 own_folder=True)
    say(f"report: {report['html']} and {report['md']}; for Ollama: ollama create NAME -f {modelfile}")
    say(report["headline"])

    if domain is not None:
        from ..rag.index import index_paths
        from ..rag.pgstore import redact

        target = db if db is not None else out / "docs.db"
        r = index_paths([str(domain)], target, chunk_tokens=recipe["index"]["chunk_tokens"],
                        overlap=recipe["index"]["overlap"], progress=progress)
        for path, why in r.skipped:
            say(f"skipped {path}: {why}")
        say(f"index: {redact(str(target))} ({r.added} added, {r.updated} updated, {r.unchanged} unchanged)")
    return {"out": str(out), **report}


# Under this many bits per weight the error of quantization alone climbs fast (the default
# model's gptq files, bench/results/quant_vs_llamacpp.md: mean KLD 0.026 at Q4_K_M's 5.2 bpw,
# 0.124 at Q4_0's), and training the file against the original (qad) is worth its time.
QAD_TIGHT_BPW = 4.5


def qad_applies(when: str, source, budget: int) -> tuple[bool, str]:
    """Whether compress trains the quantized file against the original, and why."""
    if when != "auto":
        return when == "always", f"the recipe asks for it (quantize.qad: {when})"
    from ..distill.signals import FULL_MAX_PARAMS
    from ..models.tensors import open_tensors

    n = open_tensors(source).n_params()
    bpw = 8 * budget / n
    if n > FULL_MAX_PARAMS:
        return False, f"the model ({n / 1e9:.1f}B parameters) is too large to train beside its original here"
    if bpw >= QAD_TIGHT_BPW:
        return False, f"the budget leaves {bpw:.2f} bits per weight, where quantization alone loses little"
    return True, (f"the budget leaves {bpw:.2f} bits per weight (under {QAD_TIGHT_BPW}): the quantized file is trained "
                  "against the original's logits in its own format (quantize/qad.py)")


def _iterative(src, when: str, shape_opts: dict) -> bool:
    if when != "auto" or "fraction" in shape_opts:
        return when == "always" and "fraction" not in shape_opts
    from ..distill.shapes import non_embedding_params
    from .student import teacher_facts

    t = teacher_facts(src)[0]
    s = shape_opts
    kept = non_embedding_params(t, s["layers"], s["hidden"], s["heads"], s["kv_heads"], s["ffn"])
    return kept < 0.5 * t.non_embedding()


def nearest_preset(src, budget: int) -> str:
    """llama.cpp's preset of the original whose file is the largest not over the budget (or the
    smallest of all, when every preset is over), predicted from its per-tensor plan."""
    from ..models.export_gguf import header_bytes
    from ..models.tensors import open_tensors
    from ..quantize.plan import preset_bytes

    ts = open_tensors(src)
    shapes = [(n, ts.shape(n)) for n in ts.names]
    head = header_bytes(ts)
    sizes = {}
    for preset in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"):
        sizes[preset] = head + preset_bytes(shapes, preset, ts.facts.n_layers, ts.facts.gqa)
    fitting = [p for p, s in sizes.items() if s <= budget]
    return max(fitting, key=lambda p: sizes[p]) if fitting else min(sizes, key=lambda p: sizes[p])
