"""The converter's entry points: convert() for Python callers, main() for the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from .base import OUTTYPES, ConversionError, Progress, read_json

LAYOUTS = ("single", "llama.cpp")


def convert(hf_dir, outfile, outtype: str = "f16", layout: str = "single",
            progress: Optional[Progress] = None) -> List[Path]:
    """Convert a HF model directory; returns the written GGUF paths (text/single file first)."""
    hf_dir = Path(hf_dir)
    if outtype not in OUTTYPES:
        raise ConversionError(f"unsupported outtype {outtype!r} (choose one of {', '.join(OUTTYPES)})")
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r} (choose one of {', '.join(LAYOUTS)})")
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir / 'config.json'}: file not found (is {hf_dir} a HF model directory?)")
    cfg = read_json(hf_dir / "config.json")
    archs = cfg.get("architectures") or []
    if "LlavaForConditionalGeneration" in archs or cfg.get("model_type") == "llava":
        from .llava import convert_llava_dir

        return convert_llava_dir(hf_dir, outfile, outtype, layout, progress)
    from .mllama import SUPPORTED as MLLAMA, convert_mllama_dir, is_mllama

    if is_mllama(cfg):
        return convert_mllama_dir(hf_dir, outfile, outtype, layout, progress)
    from .llava import SUPPORTED as LLAVA

    where, supported = hf_dir / "config.json", f"{LLAVA}; {MLLAMA}"
    if cfg.get("architectures") is not None:
        raise ConversionError(f"{where}: unsupported architecture {archs} (supported: {supported})")
    if cfg.get("model_type") is not None:
        raise ConversionError(f"{where}: unsupported model_type {cfg['model_type']!r} (supported: {supported})")
    raise ConversionError(f"{where}: neither 'architectures' nor 'model_type' is set (supported: {supported})")


class _TextBar:
    """A progress bar for terminals without tqdm."""

    def __init__(self, stream=sys.stderr, width=30):
        self.stream, self.width, self.start = stream, width, time.time()

    def __call__(self, done: int, total: int, name: str) -> None:
        frac = done / total if total else 1.0
        fill = int(frac * self.width)
        line = f"\r[{'#' * fill}{'.' * (self.width - fill)}] {done}/{total} {name[:40]:<40}"
        self.stream.write(line)
        if done >= total:
            self.stream.write(f"\n{time.time() - self.start:.1f} s\n")
        self.stream.flush()


def _progress_bar(enabled: bool) -> Optional[Progress]:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextBar()
    state = {}

    def update(done, total, name):
        bar = state.get("bar")
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=total, unit="tensor", desc="converting")
        bar.n = done
        bar.set_postfix_str(name, refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            state.pop("bar", None)
    return update


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="convert_hf_to_gguf",
        description="Convert a Hugging Face LLaVA-1.5 or Llama-3.2-Vision model directory (safetensors) "
                    "to GGUF for pyvtrim.")
    ap.add_argument("hf_dir", type=Path, help="model directory with config.json, *.safetensors and the tokenizer")
    ap.add_argument("--outfile", type=Path, required=True, help="output GGUF path")
    ap.add_argument("--outtype", choices=OUTTYPES, default="f16",
                    help="weight type: f32, f16 (default), bf16 (the matrices; conv kernels and position tables "
                         "f16), or q8_0 (norms and biases stay f32)")
    ap.add_argument("--layout", choices=LAYOUTS, default="single",
                    help="'single' (one file, pyvtrim's) or 'llama.cpp' (OUT + mmproj-OUT, llama.cpp's layout; "
                         "LLaVA only)")
    ap.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = convert(args.hf_dir, args.outfile, args.outtype, args.layout,
                        progress=_progress_bar(not args.no_progress))
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(f"wrote {p} ({p.stat().st_size / 2**20:.1f} MiB)")
    return 0
