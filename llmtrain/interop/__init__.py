"""Interoperability with other tools' model formats: `hf` reads and writes Hugging Face folders."""
from llmtrain.interop.hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
