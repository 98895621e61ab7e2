#!/usr/bin/env python3
"""Vision-tower attention on the CPU: ggml's flash attention against the chunked explicit form, and
transformers (SDPA, float32) on the same shapes and threads, side by side in one process.

The model: tools/bench_mllama.py's "tower5" shape, Llama-3.2-11B-Vision's tower widths (1280, 16 heads,
1601 positions per 560 px tile, 4 tiles: 6432 rows with HF's padding) with 4 local + 1 global layers, random
weights; encoding time per layer is what the full 40-layer tower repeats. For each tile count the three
encoders run in turn, `--reps` rounds (the fastest of each counts; interleaving keeps a drifting machine's
speed out of the ratios). Writes bench/results/vision_attn.json.

    python tools/bench_vision_attn.py                 # 1 and 4 tiles, 1 thread, 3 rounds
    python tools/bench_vision_attn.py --threads 2 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_mllama as bm  # noqa: E402
from bench_common import machine_limits  # noqa: E402

SHAPE = "tower5"


def tower_flops(vc: dict, tiles_run: int, tail_rows: int) -> dict:
    """Multiply-adds x 2 of the tower's layers: the matrices (q, k, v, o, fc1, fc2) on every row, the attention
    products on the rows and keys it computes (HF's padded rows see only the real tiles' keys: tail_rows)."""
    d, ff = vc["hidden_size"], vc["intermediate_size"]
    n_pos = (vc["image_size"] // vc["patch_size"]) ** 2 + 1
    rows = n_pos + (-n_pos) % 8
    L = rows * vc["max_num_tiles"]
    layers = vc["num_hidden_layers"] + vc["num_global_layers"]
    real = rows * tiles_run
    matrix = 2.0 * L * (4 * d * d + 2 * d * ff) * layers
    attn_all = 4.0 * L * L * d * layers
    attn_chunked = 4.0 * d * layers * (real * L + (L - real) * real) if tail_rows else attn_all
    return dict(matrix=matrix, attention=attn_all, attention_chunked=attn_chunked)


def hf_tower(threads: int):
    import torch
    from transformers import MllamaVisionConfig, MllamaVisionModel

    torch.set_num_threads(threads)
    cfg = bm.bench_config(SHAPE)["vision_config"]
    vc = MllamaVisionConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    vc._attn_implementation = "sdpa"
    return MllamaVisionModel(vc).eval(), cfg


def hf_inputs(cfg: dict, tiles: int):
    import torch

    T, side = cfg["max_num_tiles"], cfg["image_size"]
    grid = {1: (1, 1), 4: (2, 2)}[tiles]
    ar_id = cfg["supported_aspect_ratios"].index(list(grid)) + 1
    mask = torch.zeros(1, 1, T, dtype=torch.long)
    mask[..., :tiles] = 1
    pixels = torch.randn(1, 1, T, 3, side, side)
    return dict(pixel_values=pixels, aspect_ratio_ids=torch.tensor([[ar_id]]), aspect_ratio_mask=mask)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiles", default="1,4")
    ap.add_argument("--no-hf", action="store_true", help="leave transformers out")
    ap.add_argument("--out", default="bench/results/vision_attn.json")
    args = ap.parse_args(argv)

    import pyvtrim

    path = bm.model_path(SHAPE, "f16")
    limits = machine_limits(args.threads)
    print(f"machine: {limits}", file=sys.stderr, flush=True)
    models = {mode: pyvtrim.Model(str(path), n_ctx=512, n_threads=args.threads, vision_attn=mode,
                                  image_cache_mib=0) for mode in ("flash", "chunked")}
    hf = None if args.no_hf else hf_tower(args.threads)
    rows = []
    for tiles in [int(t) for t in args.tiles.split(",")]:
        img = bm.bench_image(bm.IMAGE_SIDES[tiles])
        ids = models["flash"].tokenize(models["flash"].chat_prompt("Describe it.", 1))
        best = {}
        for rep in range(args.reps):
            for mode, m in models.items():
                m.forward(ids, [img])
                ms = m.last_stats["t_encode_ms"]
                best[mode] = min(best.get(mode, ms), ms)
            if hf is not None:
                import torch

                model, cfg = hf
                inp = hf_inputs(cfg, tiles)
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(**inp)
                ms = (time.perf_counter() - t0) * 1000.0
                best["transformers"] = min(best.get("transformers", ms), ms)
            print(f"tiles {tiles} round {rep + 1}: " + ", ".join(f"{k} {v / 1000:.1f} s" for k, v in best.items()),
                  file=sys.stderr, flush=True)
        vc = bm.bench_config(SHAPE)["vision_config"]
        fl = tower_flops(vc, tiles, tiles < vc["max_num_tiles"])
        row = dict(tiles=tiles, encode_ms={k: round(v, 1) for k, v in best.items()},
                   chunked_over_flash=round(best["chunked"] / best["flash"], 3), flops=fl,
                   gflops_per_s_chunked=round((fl["matrix"] + fl["attention_chunked"]) / best["chunked"] / 1e6, 1))
        # the weights are f16 (the limit of their products); the attention products are f32
        row["share_of_f16_matmul_rate"] = round(row["gflops_per_s_chunked"] / limits["f16_gflops"], 3)
        row["share_of_f32_matmul_rate"] = round(row["gflops_per_s_chunked"] / limits["f32_gflops"], 3)
        if "transformers" in best:
            row["chunked_over_transformers"] = round(best["chunked"] / best["transformers"], 3)
            row["flash_over_transformers"] = round(best["flash"] / best["transformers"], 3)
        rows.append(row)
    for m in models.values():
        m.close()
    report = dict(tool="bench_vision_attn", shape=SHAPE, model=str(path.name), threads=args.threads, reps=args.reps,
                  machine_limits=limits,
                  machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
                  date=time.strftime("%Y-%m-%d %H:%M"), rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("| tiles | flash (s) | chunked (s) | transformers (s) | chunked / flash | chunked / transformers | "
          "GFLOP/s (share of f32 / f16 matmul) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        e = r["encode_ms"]
        hf_s = f"{e['transformers'] / 1000:.1f}" if "transformers" in e else "-"
        print(f"| {r['tiles']} | {e['flash'] / 1000:.1f} | {e['chunked'] / 1000:.1f} | {hf_s} | "
              f"{r['chunked_over_flash']:.2f} | {r.get('chunked_over_transformers', '-')} | "
              f"{r['gflops_per_s_chunked']} ({r['share_of_f32_matmul_rate']:.2f} / {r['share_of_f16_matmul_rate']:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
