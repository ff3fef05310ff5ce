"""The compress recipe: what each step does, with defaults that need no file at all.

A recipe file (YAML) overrides any of these keys; a key we do not know is an error that names
it, since a misspelt option silently ignored would run a different job than the one asked for.
"""
from __future__ import annotations

import copy
from pathlib import Path

from ..errors import PocketError

DEFAULTS: dict = {
    "distill": {
        "when": "auto",  # auto: only when quantization alone cannot reach the budget; or always / never
        "tokens": 200_000,
        "loss": "fkl",
        "data": [],  # text files or folders; default: the calibration text
        "fraction": None,  # of the teacher's non-embedding parameters; default: sized for the budget
    },
    "quantize": {"method": "gptq", "calib": [], "calib_tokens": 8192},
    "evaluate": {"texts": [], "max_tokens": 4096, "ctx": 512, "mmlu": None, "mmlu_limit": 100, "speed": True,
                 "compare_preset": True},
    "index": {"chunk_tokens": 256, "overlap": 32},
}


def load_recipe(path: str | Path | None = None, **overrides) -> dict:
    """Defaults, then the file's values, then `overrides` given as 'step.key'=value."""
    recipe = copy.deepcopy(DEFAULTS)
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise PocketError(f"no recipe file at {path}")
        try:
            given = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise PocketError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(given, dict):
            raise PocketError(f"{path}: a recipe is a mapping of steps (distill, quantize, evaluate, index)")
        for step, values in given.items():
            if step not in DEFAULTS:
                raise PocketError(f"{path}: unknown step {step!r} (known: {', '.join(DEFAULTS)})")
            if not isinstance(values, dict):
                raise PocketError(f"{path}: step {step!r} wants a mapping of settings")
            for key, value in values.items():
                if key not in DEFAULTS[step]:
                    raise PocketError(f"{path}: unknown key {step}.{key} (known: {', '.join(DEFAULTS[step])})")
                recipe[step][key] = value
    for dotted, value in overrides.items():
        if value is not None:
            step, key = dotted.split(".")
            recipe[step][key] = value
    if recipe["distill"]["when"] not in ("auto", "always", "never"):
        raise PocketError("distill.when must be auto, always or never")
    return recipe
