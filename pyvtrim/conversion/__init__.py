"""HF -> GGUF conversion (no torch, no transformers needed).

    from pyvtrim.conversion import convert
    convert("llava-1.5-7b-hf/", "llava.gguf", outtype="f16")
    convert("Llama-3.2-11B-Vision-Instruct/", "mllama.gguf", outtype="q8_0")   # arch "mllama"

Command line: ``python -m pyvtrim.conversion HF_DIR --outfile OUT.gguf --outtype f16``
(or tools/convert_hf_to_gguf.py, the same program).
"""

from __future__ import annotations

from .base import OUTTYPES, ConversionError
from .cli import convert, main

__all__ = ["ConversionError", "OUTTYPES", "convert", "main"]
