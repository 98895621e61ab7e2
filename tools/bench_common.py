"""Shapes and measurements shared by the benchmark scripts in tools/ (imported by them, not run)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

TEXT_SHAPES = {
    # TinyLlama-1.1B: 22 layers, 2048 wide, 32 heads / 4 KV heads, ff 5632
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4),
    # Llama-2-7B / Vicuna-7B (LLaVA-1.5-7B's text model)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}
# LLaVA-1.5's vision tower, openai/clip-vit-large-patch14-336
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)


def vision_flops(clip: dict, n_patches: int, n_embd_text: int) -> float:
    """The CLIP tower's FLOPs for one unreduced image, by the runtime's formulas for a reduced one (2 per
    multiply-add: q/k/v/o, QK^T and AV, the MLP; the layers up to feature layer -2; the mlp2x projector on
    the patches) plus the patch embedding."""
    d, ff, n, t = clip["hidden_size"], clip["intermediate_size"], n_patches + 1, n_embd_text
    layer = 2 * n * 4 * d * d + 4 * n * n * d + 2 * n * 2 * d * ff
    patch = 2 * n_patches * 3 * clip["patch_size"] ** 2 * d
    projector = 2 * n_patches * (d * t + t * t)
    return float((clip["num_hidden_layers"] - 1) * layer + patch + projector)


def machine_limits(n_threads: int, n: int = 2048) -> dict:
    """What this machine sustains with these threads (the C library's vtrim_measure_machine: ggml's product of
    two n x n matrices with f32, f16 and bf16 weights, and a 256 MiB copy), for the benchmarks' "share of
    limit" figures: prefill FLOP/s over the matmul rate of the weights' type, decode bytes/s over the copy
    bandwidth."""
    from pyvtrim import _ffi

    ffi, lib = _ffi.get()[:2]
    out = ffi.new("struct vtrim_machine_rates *")
    if lib.vtrim_measure_machine(int(n_threads), int(n), out) != 0:
        raise RuntimeError(ffi.string(lib.vtrim_last_error()).decode())
    return dict(threads=n_threads, matmul_n=n, f32_gflops=round(out.f32_flops / 1e9, 1),
                f16_gflops=round(out.f16_flops / 1e9, 1), bf16_gflops=round(out.bf16_flops / 1e9, 1),
                copy_gb_per_s=round(out.copy_bytes_per_s / 1e9, 2))


def best_of_prefills(m, ids: list, images: list, reduce, reps: int):
    """Prefills the prompt `reps` times (each from an empty sequence) and returns the fastest run's figures
    (time to first token, encode, prefill, token and KV counts, FLOPs, stages) with the last run's logits,
    from which decoding can continue."""
    best: dict = {}
    logits = None
    for _ in range(reps):
        t0 = time.perf_counter()
        logits = m.forward(ids, images, reduce=reduce)
        ttft = (time.perf_counter() - t0) * 1000.0
        st = m.last_stats
        if not best or ttft < best["ttft_ms"]:
            best = dict(ttft_ms=ttft, encode_ms=st["t_encode_ms"], prefill_ms=st["t_prefill_ms"],
                        n_prompt_tokens=st["n_prompt_tokens"], n_image_tokens=st["n_image_tokens"],
                        n_image_tokens_kept=st["n_image_tokens_kept"], kv_cache_bytes=st["kv_cache_bytes"],
                        prefill_flops=st["prefill_flops"], prefill_flops_full=st["prefill_flops_full"],
                        stages=st["stages"])
    return best, logits


def greedy_decode(m, logits, n: int) -> float:
    """Decodes n greedy tokens after `logits` (end-of-generation ignored); returns the seconds taken."""
    import numpy as np

    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(n):
        m.decode(tok)
        tok = int(np.argmax(m.logits()))
    return time.perf_counter() - t0


def write_report(out: str, report: dict) -> None:
    """Writes a benchmark's JSON with the machine and the date added."""
    report = dict(report, machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
                  date=time.strftime("%Y-%m-%d %H:%M"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
