"""What every pocketlm command shares: parameter types checked when the command line is read,
the flags that mean one thing everywhere, and the rule that bad input is one `error:` line and
exit status 1 (click's own rejections included), never a traceback."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from .errors import PocketError


def user_errors(fn):
    """Bad input becomes one line on stderr and exit status 1, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PocketError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:  # disk full, permission denied, ...: the OS already said it well
            click.echo(f"error: {exc.strerror or exc} ({exc.filename or ''})", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


def refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise PocketError(f"{path} exists; pass --force to replace it")


class OneLineErrors(click.Group):
    """click's own rejections (a bad choice, a number out of range, an unknown option) as one
    `error:` line and exit status 1, like every other bad input, instead of a usage block and 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(1)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


class Parsed(click.ParamType):
    """A value read by one of pocketlm's parsers when the command line is read (so a typo costs no
    model load); the parser is imported late, keeping `--help` fast."""

    def __init__(self, name: str, parser: str, done: type):
        self.name, self.parser, self.done = name, parser, done

    def convert(self, value, param, ctx):
        import importlib

        if isinstance(value, self.done):  # a default or a value already converted
            return value
        module, _, fn = self.parser.rpartition(".")
        try:
            return getattr(importlib.import_module(module, __package__), fn)(value)
        except PocketError as exc:
            self.fail(str(exc), param, ctx)


SIZE = Parsed("size", ".quantize.budget.parse_size", int)  # 60MB, 57.5MiB, 1GB -> bytes
MEMORY = Parsed("memory", ".runtime.memory.parse_memory", tuple)  # 1GB or phone-4gb -> (bytes, how to say it)


def memory_options(fn):
    """--target-memory and the --ctx it is for, one meaning in quantize, plan and compress."""
    from .runtime.memory import PROFILES

    fn = click.option("--ctx", type=click.IntRange(16, 1 << 20), default=4096, show_default=True,
                      help="Context length the memory budget is for.")(fn)
    return click.option("--target-memory", type=MEMORY, default=None,
                        help="Run-time memory to fit at --ctx (weights + KV cache + llama.cpp's buffers, checked by "
                             f"running the file), e.g. 1GB, or a device profile ({', '.join(PROFILES)}).")(fn)
POSITIVE = click.IntRange(min=1)


def given(*names: str) -> bool:
    """Whether any of these parameters came from the command line (not a default)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return any(ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE for n in names)


def qad_options(fn):
    """What --method qad trains for (quantize/qad.py); the defaults are QadOptions'."""
    from .quantize.qad_options import CODES, KQUANT_LR, LEGACY_LR, QadOptions  # not qad.py: the CLI must not import torch to parse flags

    d = QadOptions()
    fn = click.option("--resume", is_flag=True, help="With --method qad: continue an interrupted training run.")(fn)
    fn = click.option("--teacher", default=None, help="With --method qad: train against this model (the original a "
                      "distilled MODEL was made from) instead of MODEL itself.")(fn)
    fn = click.option("--qad-codes", type=click.Choice(list(CODES)), default=d.codes, show_default=True,
                      help="With --method qad: " + "; ".join(f"{k}: {v}" for k, v in CODES.items()) + ".")(fn)
    fn = click.option("--qad-epochs", type=POSITIVE, default=d.epochs, show_default=True,
                      help="With --method qad: passes over the --tokens of text (each pass takes as long as the first).")(fn)
    fn = click.option("--lr", type=click.FloatRange(0, 1, min_open=True), default=d.lr,
                      help=f"With --method qad: grid steps per optimizer step [default: {KQUANT_LR} for files mostly of "
                      f"k-quants, {LEGACY_LR} for the others].")(fn)
    return click.option("--tokens", type=POSITIVE, default=d.tokens, show_default=True,
                        help="With --method qad: training tokens (of --calib, else bundled general text).")(fn)


def deprecated(old: str, new: str) -> None:
    click.echo(f"warning: {old} is deprecated and will go; use {new}", err=True)


def json_option(fn):
    """--json prints JSON on stdout, in every command. `--json PATH` (eval and plan once wrote
    there) still works, with a deprecation line: write files with -o/--output."""
    return click.option("--json", "as_json", is_flag=False, flag_value="-", default=None, metavar="",
                        help="Print JSON on stdout instead of tables.")(fn)


def json_target(as_json: str | None, output: Path | None) -> tuple[bool, Path | None]:
    """(print JSON on stdout, file to write it to) from --json and -o."""
    if as_json is not None and as_json != "-":
        deprecated("--json PATH", "-o PATH")
        if output is not None:
            raise PocketError("give the output file once: -o PATH")
        return False, Path(as_json)
    return as_json == "-", output


def write_result(path: Path, data, force: bool) -> None:
    from .util.atomic import write_json

    refuse_existing(path, force)
    write_json(path, data)
    click.echo(f"wrote {path}", err=True)


THREADS = click.option("--threads", default=None, type=POSITIVE,
                       help="CPU threads for llama.cpp (default: every core the process may use).")


class IntList(click.ParamType):
    """Comma-separated non-negative integers such as 3,7,12; checked when the command line is read."""
    name = "int,int,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            numbers = [int(x) for x in str(value).replace(" ", "").split(",") if x]
        except ValueError:
            self.fail(f"wants comma-separated numbers, got {value!r}", param, ctx)
        if not numbers or min(numbers) < 0:
            self.fail(f"wants one or more numbers of 0 or more, got {value!r}", param, ctx)
        return numbers


def check_files(paths, flag: str) -> None:
    for p in paths:
        if not Path(p).exists():
            raise PocketError(f"{flag} {p}: no such file or folder")


def terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a container stopping) cleans up exactly like Ctrl-C


class IndexDB(click.ParamType):
    """--db: an SQLite index file, or a postgresql:// URL (kept as text: a Path would fold its '//')."""
    name = "FILE|postgresql://..."

    def convert(self, value, param, ctx):
        if isinstance(value, Path):
            return value
        text = str(value)
        if text.startswith(("postgresql://", "postgres://")):
            return text
        if "://" in text:
            self.fail(f"{text.split('://')[0]}:// is not an index; give an SQLite file or a postgresql:// URL", param, ctx)
        return Path(text)


DB = IndexDB()
