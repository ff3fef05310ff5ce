"""What other apps need beside a GGUF: an Ollama `Modelfile` and a model card (`README.md`).

llama.cpp and LM Studio read the chat template from the GGUF itself; Ollama wants it as a Go
template in the Modelfile, and guesses when there is none. A Jinja template cannot be
translated in general, so the known chat formats are recognised by their turn markers (each
one's Go form written once here), and a model with no recognised format gets a plain
completion template, said in a comment, rather than a wrong guess.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..util.atomic import write_text

# Defaults the file is handed off with: pocketlm chat's temperature; a context every
# supported model takes and a laptop holds (the KV cache of a 1-8B model at 4096 is 0.1-0.5 GB).
TEMPERATURE = 0.7
NUM_CTX = 4096


@dataclass(frozen=True)
class ChatFormat:
    name: str
    marker: str  # a string only this format's Jinja template holds
    template: str  # the same turns as an Ollama Go template
    stops: tuple[str, ...]  # end-of-turn tokens, besides the model's end-of-text
    system_turn: str = ""  # a system turn's text, as a regex group: how a template's default system prompt is found


FORMATS = (
    ChatFormat("chatml", "<|im_start|>",
               "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n", ("<|im_end|>",), r"<\|im_start\|>system\n(.*?)<\|im_end\|>"),
    ChatFormat("llama3", "<|start_header_id|>",
               "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",),
               r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"),
    # Gemma has no system turn: its template puts the system text at the head of the first user turn
    ChatFormat("gemma", "<start_of_turn>",
               "{{- range $i, $_ := .Messages }}{{- if eq .Role \"user\" }}<start_of_turn>user\n"
               "{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
               "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}"
               "{{- end }}<start_of_turn>model\n", ("<end_of_turn>",)),
)
PLAIN = ChatFormat("completion", "", "{{ .Prompt }}", ())


@dataclass(frozen=True)
class GGUFChat:
    """What a Modelfile needs from the file: its chat format, end-of-text token and the system
    prompt its template adds when a conversation has none (Ollama then adds the same)."""
    name: str
    format: ChatFormat
    eos: str | None
    vocab: frozenset[str]
    system: str | None = None


def default_system(jinja: str, fmt: ChatFormat) -> str | None:
    """The system text the Jinja template writes for a conversation without one, if any."""
    import re

    from jinja2.exceptions import TemplateError
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    if not fmt.system_turn:
        return None
    try:  # rendered as the runtime renders it (runtime/llama_cpp_backend.py: sandboxed, transformers' whitespace rules)
        text = Jinja2ChatFormatter(jinja, eos_token="", bos_token="")(messages=[{"role": "user", "content": "x"}]).prompt
    except (TemplateError, TypeError, ValueError):
        return None  # a template that needs more than messages: no default read from it
    m = re.match(fmt.system_turn, text, flags=re.S)
    return m.group(1) if m else None


def chat_of(gguf_path: Path) -> GGUFChat:
    from ..models.gguf_file import field_value, open_gguf

    reader = open_gguf(gguf_path)
    template = field_value(reader, "tokenizer.chat_template") or ""
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    eos_id = field_value(reader, "tokenizer.ggml.eos_token_id")
    fmt = next((f for f in FORMATS if f.marker in template), PLAIN)
    eos = tokens[eos_id] if isinstance(eos_id, int) and 0 <= eos_id < len(tokens) else None
    return GGUFChat(str(field_value(reader, "general.name") or Path(gguf_path).stem), fmt, eos, frozenset(tokens),
                    default_system(template, fmt) if template else None)


def modelfile_text(gguf_path: Path, made_from: str, modelfile_name: str = "Modelfile") -> str:
    chat = chat_of(gguf_path)
    stops = [s for s in (*chat.format.stops, chat.eos) if s and s in chat.vocab]
    lines = [f"# {Path(gguf_path).name}: {made_from}. Made by pocketlm.",
             f"# ollama create NAME -f {modelfile_name}",
             f"FROM ./{Path(gguf_path).name}"]
    if chat.format is PLAIN:
        lines.append("# no chat template recognised in the file (a base model?): prompts go in as they are")
    else:
        lines.append(f"# chat format: {chat.format.name} (from the file's tokenizer.chat_template)")
    lines.append(f'TEMPLATE """{chat.format.template}"""')
    if chat.system:
        lines.append(f'SYSTEM """{chat.system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    lines += [f"PARAMETER temperature {TEMPERATURE}", f"PARAMETER num_ctx {NUM_CTX}", ""]
    return "\n".join(lines)


def model_card_text(gguf_path: Path, made_from: str, how: list[str], table: list[list[str]] | None,
                    tags: tuple[str, ...] = (), modelfile_name: str = "Modelfile") -> str:
    """A Hugging Face style card: YAML front matter, what the file is, how it was made, how it scored."""
    from ..eval.report import md_table
    from ..models.info import inspect

    info = inspect(str(gguf_path))
    name = Path(gguf_path).name
    front = ["---", "library_name: gguf", "tags:", *[f"- {t}" for t in ("gguf", "pocketlm", *tags)], "---"]
    body = [f"# {name}", "",
            f"{made_from}: a {info.architecture} model of {info.n_params / 1e6:.0f}M parameters in "
            f"{info.file_size / 1e6:.1f} MB ({info.bpw:.2f} bits per weight), for llama.cpp, "
            "Ollama and LM Studio.", "", "## How it was made", "", *[f"- {h}" for h in how], "", "## Evaluation", ""]
    body += (md_table(table) + ["", "Mean KLD and top-1 are measured against the original model on held-out text "
                                 "(see pocketlm's report.md beside this file)."]) if table else \
        ["Not evaluated here: `pocketlm eval " + name + " --reference ORIGINAL` measures it."]
    body += ["", "## Use it", "", "```sh", f"ollama create my-model -f {modelfile_name}",
             f"llama-cli -m {name} -cnv", f"pocketlm chat {name}", "```", ""]
    return "\n".join(front + body)


def handoff_paths(gguf_path: Path, own_folder: bool) -> tuple[Path, Path]:
    """(Modelfile, model card) beside the GGUF: `Modelfile` and `README.md` in a folder pocketlm
    made for it (compress's), else named after the file, so no README of the user's is replaced."""
    gguf_path = Path(gguf_path)
    if own_folder:
        return gguf_path.with_name("Modelfile"), gguf_path.with_name("README.md")
    return gguf_path.with_name(gguf_path.stem + ".Modelfile"), gguf_path.with_name(gguf_path.stem + ".md")


def write_handoff(gguf_path: Path, made_from: str, how: list[str], table: list[list[str]] | None = None,
                  tags: tuple[str, ...] = (), own_folder: bool = False) -> tuple[Path, Path]:
    """The Modelfile and the model card beside the GGUF; returns their paths."""
    gguf_path = Path(gguf_path)
    modelfile, card = handoff_paths(gguf_path, own_folder)
    write_text(modelfile, modelfile_text(gguf_path, made_from, modelfile.name))
    write_text(card, model_card_text(gguf_path, made_from, how, table, tags, modelfile.name))
    return modelfile, card
