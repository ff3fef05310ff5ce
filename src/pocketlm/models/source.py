"""Turn what a user typed (a folder, a .gguf file, a registry name) into a typed source."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import PocketError
from .registry import REGISTRY, resolve_name

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" (config.json + safetensors folder) or "gguf"
    path: Path
    name: str  # what the user typed, for reports

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def resolve(source: str | os.PathLike | ModelSource) -> ModelSource:
    if isinstance(source, ModelSource):
        return source
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists():
        located = resolve_name(text)
        if located is None:
            known = ", ".join(REGISTRY)
            raise PocketError(f"no such file, folder or model name: {text} (known names: {known})")
        if not located.exists():
            raise PocketError(f"model {text} should be at {located} but that file is missing; reinstall its package")
        path = located
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PocketError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise PocketError(f"{path} has config.json but no weights (*.safetensors)")
        return ModelSource("hf", path.resolve(), text)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise PocketError(f"{path} is neither a GGUF file (bad magic bytes) nor a model folder")
    return ModelSource("gguf", path.resolve(), text)
