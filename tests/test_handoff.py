"""The Modelfile and model card beside a GGUF: parsed back, and the chat template rendered as
Ollama would, compared with what the model's own (Jinja) template gives."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pocketlm.cli import cli
from pocketlm.models.gguf_file import field_value, open_gguf
from pocketlm.models.source import resolve
from pocketlm.runtime.handoff import FORMATS, chat_of, modelfile_text, write_handoff


# -- a Modelfile, read the way Ollama's parser reads it --------------------------------------
def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs; triple-quoted arguments may span lines."""
    out, lines = [], iter(text.splitlines(keepends=True))
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        op, _, arg = line.partition(" ")
        assert op.upper() in {"FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "STOP"}, f"unknown instruction {op!r}"
        if arg.startswith('"""'):
            body = arg[3:]
            while '"""' not in body:
                body += next(lines)
            body, _, rest = body.partition('"""')
            assert not rest.strip(), rest
            arg = body
        out.append((op.upper(), arg.rstrip("\n") if op.upper() != "TEMPLATE" else arg))
    return out


# -- enough of Go's text/template to render the chat templates handoff.py writes ---------------
def render_go(template: str, system: str | None, messages: list[dict]) -> str:
    parts = re.split(r"({{-?.*?-?}})", template, flags=re.S)
    for i, p in enumerate(parts):  # trim markers eat the whitespace beside them
        if p.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip()
        if p.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()
    tokens = [("action", p.strip("{}-").strip()) if p.startswith("{{") else ("text", p) for p in parts]
    pos = 0

    def block(end_words):
        nonlocal pos
        body = []
        while pos < len(tokens):
            kind, v = tokens[pos]
            if kind == "action" and v.split(" ")[0] in end_words:
                return body
            pos += 1
            if kind == "text":
                body.append(("text", v))
            elif v.startswith("if "):
                branches = [(v[3:], block({"else", "end"}))]
                while tokens[pos][1] != "end":
                    cond = tokens[pos][1]
                    pos += 1
                    branches.append((cond[8:] if cond.startswith("else if ") else "true", block({"else", "end"})))
                pos += 1
                body.append(("if", branches))
            elif v.startswith("range "):
                inner = block({"end"})
                pos += 1
                body.append(("range", v[6:], inner))
            else:
                body.append(("expr", v))
        return body

    def value(expr: str, dot, var):
        expr = expr.strip()
        if expr.startswith("(") and expr.endswith(")"):
            return value(expr[1:-1], dot, var)
        args = re.findall(r'\([^)]*\)|"[^"]*"|\S+', expr)
        if args[0] == "eq":
            return value(args[1], dot, var) == value(args[2], dot, var)
        if args[0] == "and":
            return all(value(a, dot, var) for a in args[1:])
        if expr == "true":
            return True
        if expr.startswith('"'):
            return expr[1:-1]
        if expr.isdigit():
            return int(expr)
        if expr in (".System", "$.System"):  # the templates read .System only outside a range
            return system
        if expr == ".Messages":
            return messages
        if expr.startswith("$"):
            return var[expr]
        return dot[expr[1:].lower()]  # .Role, .Content of a message

    def run(body, dot, var) -> str:
        out = ""
        for node in body:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "expr":
                out += str(value(node[1], dot, var))
            elif node[0] == "if":
                out += next((run(b, dot, var) for cond, b in node[1] if value(cond, dot, var)), "")
            else:
                m = re.fullmatch(r"(?:\$(\w+), \$\w* := )?(\S+)", node[1])
                assert m, node[1]
                for i, item in enumerate(value(m.group(2), dot, var)):
                    out += run(node[2], item, {**var, **({f"${m.group(1)}": i} if m.group(1) else {})})
        return out

    tree = block(set())
    return run(tree, None, {})


CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Why is the sky blue?"}]
# what each format's published layout gives for CONVERSATION with the system text "Be brief."
EXPECTED = {
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
              "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nWhy is the sky blue?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
             "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n",
}


def test_chatml_template_renders_as_the_models_own_jinja_template():
    """SmolLM2's file carries a ChatML Jinja template: Ollama's rendering must give the same prompt."""
    from jinja2 import Template

    path = resolve("smollm2-135m").path
    chat = chat_of(path)
    assert chat.format.name == "chatml" and chat.eos == "<|im_end|>"
    jinja = field_value(open_gguf(path), "tokenizer.chat_template")
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    want = Template(jinja).render(messages=messages, add_generation_prompt=True)
    assert render_go(chat.format.template, "Be brief.", CONVERSATION) == want
    # no system message: the template adds its own, and the Modelfile's SYSTEM gives Ollama the same
    want = Template(jinja).render(messages=CONVERSATION, add_generation_prompt=True)
    system = dict(parse_modelfile(modelfile_text(path, "a test")))["SYSTEM"]
    assert chat.system == system and "SmolLM" in system
    assert render_go(chat.format.template, system, CONVERSATION) == want


@pytest.mark.parametrize("name", ["llama3", "gemma"])
def test_other_formats_render_their_published_layout(name):
    fmt = next(f for f in FORMATS if f.name == name)
    assert render_go(fmt.template, "Be brief.", CONVERSATION) == EXPECTED[name]


def test_a_file_without_a_chat_template_gets_a_plain_completion_template():
    path = resolve("gemma3-270m").path  # the base model: no chat template in the file
    items = parse_modelfile(modelfile_text(path, "a test"))
    assert ("TEMPLATE", "{{ .Prompt }}") in items
    assert ("PARAMETER", 'stop "<eos>"') in items


def check_handoff(modelfile: Path, card: Path, gguf: Path, rows: dict | None = None) -> None:
    """Both files parse; the Modelfile points at the GGUF beside it, its stops are the model's
    tokens; the card's front matter is YAML and its table holds the evaluation's numbers."""
    items = parse_modelfile(modelfile.read_text())
    froms = [a for op, a in items if op == "FROM"]
    assert froms == [f"./{gguf.name}"] and (modelfile.parent / froms[0]).resolve() == gguf.resolve()
    vocab = set(field_value(open_gguf(gguf), "tokenizer.ggml.tokens"))
    stops = [a for op, a in items if op == "PARAMETER" and a.startswith("stop ")]
    assert stops and all(s.split(" ", 1)[1].strip('"') in vocab for s in stops), stops
    assert sum(op == "TEMPLATE" for op, _ in items) == 1
    text = card.read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "gguf" and "pocketlm" in front["tags"]
    if rows:
        line = next(ln for ln in text.splitlines() if ln.startswith("| pocketlm |"))
        assert f"{rows['pocketlm']['kld_mean']:.4f}" in line


def test_quantize_modelfile_writes_both_beside_the_output(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("the user's own readme\n")
    out = tmp_path / "small.gguf"
    r = CliRunner().invoke(cli, ["quantize", "smollm2-135m", "-o", str(out), "--type", "Q4_0", "--method", "rtn", "--modelfile"])
    assert r.exit_code == 0, r.output
    check_handoff(tmp_path / "small.Modelfile", tmp_path / "small.md", out)
    assert readme.read_text() == "the user's own readme\n"  # never a README of the user's replaced


def test_write_handoff_in_its_own_folder_uses_the_plain_names(tmp_path):
    gguf = tmp_path / "model.gguf"
    shutil.copy(resolve("smollm2-135m").path, gguf)
    modelfile, card = write_handoff(gguf, "a test", ["made by hand"], None, own_folder=True)
    assert (modelfile.name, card.name) == ("Modelfile", "README.md")
    check_handoff(modelfile, card, gguf)
    assert "Not evaluated here" in card.read_text()
