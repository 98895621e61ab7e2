#!/usr/bin/env python3
"""Convert a Hugging Face LLaVA-1.5 or Llama-3.2-Vision model to GGUF: a thin wrapper over pyvtrim.conversion.

    python tools/convert_hf_to_gguf.py llava-1.5-7b-hf/ --outfile llava.gguf --outtype f16
    python tools/convert_hf_to_gguf.py llava-1.5-7b-hf/ --outfile text.gguf --layout llama.cpp   # + mmproj-text.gguf
    python tools/convert_hf_to_gguf.py Llama-3.2-11B-Vision-Instruct/ --outfile mllama.gguf --outtype q8_0
"""

import sys
from pathlib import Path

try:
    from pyvtrim.conversion import main
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pyvtrim.conversion import main

if __name__ == "__main__":
    sys.exit(main())
