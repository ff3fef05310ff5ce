"""The compress recipe: what each step does, with defaults that need no file at all.

A recipe file (YAML) overrides any of these keys. The schema below checks every value before
any model is loaded: a misspelt key or a wrong value is an error that names the key, the value
and what is allowed, since one silently ignored or caught late would run a different job, or
fail an hour in, than the one asked for.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import PocketError


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DistillStep(_Step):
    when: Literal["auto", "always", "never"] = "auto"  # auto: only when quantization alone cannot reach the budget
    tokens: int = Field(200_000, ge=1)
    loss: str = "fkl"
    targets: Literal["auto", "full", "sampled", "topk"] = "auto"  # the teacher's signal: distill/signals.py
    ce_weight: Optional[float] = Field(None, ge=0)  # of the data's cross-entropy, added to the divergence; None: 1 with fkl
    hidden_weight: float = Field(0.0, ge=0)  # of the final hidden state's cosine distance (targets full)
    data: list[str] = []  # text files or folders; default: the bundled general text (+ --domain)
    fraction: Optional[float] = Field(None, gt=0, lt=1)  # of the teacher's non-embedding parameters; default: chosen by pilots
    pilot_tokens: int = Field(40_000, ge=0)  # per finalist shape (distill/choose.py); 0: no pilots
    iterative: Literal["auto", "always", "never"] = "auto"  # prune -> heal in two stages (distill/stages.py); auto:
    # when the student keeps under half the teacher's non-embedding parameters

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        from ..distill.loss_spec import parse_loss

        try:
            parse_loss(value)
        except PocketError as exc:
            raise ValueError(str(exc).replace("--loss", "loss")) from None
        return value

    @model_validator(mode="after")
    def _loss_and_targets(self):
        from ..distill.loss_spec import check_targets, parse_loss

        try:
            check_targets(parse_loss(self.loss)[0], "bucket", self.targets, self.ce_weight, self.hidden_weight)
        except PocketError as exc:
            raise ValueError(str(exc).replace("--loss", "loss").replace("--targets", "targets")
                             .replace("--ce-weight", "ce_weight").replace("--hidden-weight", "hidden_weight")) from None
        return self


class QuantizeStep(_Step):
    method: Literal["rtn", "imatrix", "gptq"] = "gptq"
    calib: list[str] = []
    calib_tokens: int = Field(8192, ge=1)
    # then train the file against the original (quantize/qad.py); auto: when the budget is tight
    # (compress/pipeline.py's qad_applies) and the original is small enough to run beside it
    qad: Literal["auto", "always", "never"] = "auto"
    qad_tokens: int = Field(100_000, ge=1)
    qad_epochs: int = Field(1, ge=1)  # passes over qad_tokens (qad_options.QadOptions.epochs: why one)
    # gptq weighs its calibration tokens by the logits' Fisher energy (quantize/fisher.py); off by
    # default until compress's measured numbers are rerun with it
    fisher: bool = False

    @model_validator(mode="after")
    def _fisher_needs_gptq(self):
        if self.fisher and self.method != "gptq":
            raise ValueError(f"fisher weighs gptq's calibration tokens: it needs method gptq, not {self.method}")
        return self


class EvaluateStep(_Step):
    texts: list[str] = []
    max_tokens: int = Field(4096, ge=1)
    ctx: int = Field(512, ge=2)
    mmlu: Optional[str] = None
    mmlu_limit: Optional[int] = Field(100, ge=1)
    speed: bool = True
    compare_preset: bool = True


class IndexStep(_Step):
    chunk_tokens: int = Field(256, ge=16)
    overlap: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _chunking(self):
        from ..rag.chunking import check_chunking

        try:
            check_chunking(self.chunk_tokens, self.overlap)
        except PocketError as exc:
            raise ValueError(str(exc)) from None
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    distill: DistillStep = DistillStep()
    quantize: QuantizeStep = QuantizeStep()
    evaluate: EvaluateStep = EvaluateStep()
    index: IndexStep = IndexStep()


STEPS = tuple(Recipe.model_fields)


def _explain(exc: ValidationError, where: str) -> PocketError:
    """pydantic's first complaint as one line: the key, the value given, what is allowed."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        if len(err["loc"]) == 1:
            return PocketError(f"{where}unknown step {key!r} (known: {', '.join(STEPS)})")
        step = Recipe.model_fields[str(err["loc"][0])].annotation
        known = step.model_fields if isinstance(step, type) and issubclass(step, BaseModel) else {}
        return PocketError(f"{where}unknown key {key} (known: {', '.join(known)})")
    msg = re.sub(r" or instance of \w+", "", err["msg"].removeprefix("Value error, "))
    if err["type"] == "value_error" and not err["loc"][1:]:  # a check across keys: its message names them
        return PocketError(f"{where}{key}: {msg}")
    return PocketError(f"{where}{key} = {err['input']!r}: {msg}")


def load_recipe(path: str | Path | None = None, **overrides) -> dict:
    """Defaults, then the file's values, then `overrides` given as 'step.key'=value (None: not
    given); every value checked. Returns the recipe as plain dicts, one per step."""
    given: dict = {}
    where = ""
    if path is not None:
        import yaml

        path = Path(path)
        where = f"{path}: "
        if not path.is_file():
            raise PocketError(f"no recipe file at {path}")
        try:
            given = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise PocketError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(given, dict):
            raise PocketError(f"{path}: a recipe is a mapping of steps ({', '.join(STEPS)})")
    for dotted, value in overrides.items():
        if value is not None:
            step, key = dotted.split(".")
            section = given.setdefault(step, {})
            if isinstance(section, dict):
                section[key] = value
    try:
        return Recipe.model_validate(given).model_dump()
    except ValidationError as exc:
        raise _explain(exc, where) from None
