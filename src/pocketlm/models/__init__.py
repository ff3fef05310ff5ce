"""Loading, inspecting and exporting models: HF folders, GGUF files, registry names."""
from .info import ModelInfo, inspect
from .load import LoadedModel, load
from .registry import DEFAULT_MODEL, REGISTRY
from .source import ModelSource, resolve

__all__ = ["DEFAULT_MODEL", "REGISTRY", "LoadedModel", "ModelInfo", "ModelSource", "inspect", "load", "resolve"]
