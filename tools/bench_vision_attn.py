#!/usr/bin/env python3
"""Vision-tower attention on the CPU: ggml's flash attention against the chunked explicit form, and
transformers (SDPA, float32) on the same shapes and threads, side by side in one process.

The model: tools/bench_mllama.py's "tower5" shape, Llama-3.2-11B-Vision's tower widths (1280, 16 heads,
1601 positions per 560 px tile, 4 tiles: 6432 rows with HF's padding) with 4 local + 1 global layers, random
weights; encoding time per layer is what the full 40-layer tower repeats. For each tile count the three
encoders run in turn, `--reps` rounds (the fastest of each counts; interleaving keeps a drifting machine's
speed out of the ratios). With one thread, each encode's CPU time (the process's, over the call) is recorded
too: on a machine shared with other jobs it counts the work done, not the time the scheduler gave to others,
so its ratios are the steadier ones. Writes bench/results/vision_attn.json.

    python tools/bench_vision_attn.py                 # 1 and 4 tiles, 1 thread, 3 rounds
    python tools/bench_vision_attn.py --threads 2 --reps 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_mllama as bm  # noqa: E402
from bench_common import machine_limits, write_report  # noqa: E402

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
        best, cpu = {}, {}
        for rep in range(args.reps):
            for mode, m in models.items():
                c0 = time.process_time()
                m.forward(ids, [img])
                c = (time.process_time() - c0) * 1000.0
                ms = m.last_stats["t_encode_ms"]
                best[mode], cpu[mode] = min(best.get(mode, ms), ms), min(cpu.get(mode, c), c)
            if hf is not None:
                import torch

                model, cfg = hf
                inp = hf_inputs(cfg, tiles)
                t0, c0 = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    model(**inp)
                ms, c = (time.perf_counter() - t0) * 1000.0, (time.process_time() - c0) * 1000.0
                best["transformers"] = min(best.get("transformers", ms), ms)
                cpu["transformers"] = min(cpu.get("transformers", c), c)
            print(f"tiles {tiles} round {rep + 1}: " + ", ".join(f"{k} {v / 1000:.1f} s (cpu {cpu[k] / 1000:.1f} s)"
                                                                  for k, v in best.items()),
                  file=sys.stderr, flush=True)
        vc = bm.bench_config(SHAPE)["vision_config"]
        fl = tower_flops(vc, tiles, tiles < vc["max_num_tiles"])
        row = dict(tiles=tiles, encode_ms={k: round(v, 1) for k, v in best.items()},
                   cpu_ms={k: round(v, 1) for k, v in cpu.items()},
                   chunked_over_flash=round(best["chunked"] / best["flash"], 3),
                   chunked_over_flash_cpu=round(cpu["chunked"] / cpu["flash"], 3), flops=fl,
                   gflops_per_s_chunked=round((fl["matrix"] + fl["attention_chunked"]) / best["chunked"] / 1e6, 1))
        # the weights are f16 (the limit of their products); the attention products are f32
        row["share_of_f16_matmul_rate"] = round(row["gflops_per_s_chunked"] / limits["f16_gflops"], 3)
        row["share_of_f32_matmul_rate"] = round(row["gflops_per_s_chunked"] / limits["f32_gflops"], 3)
        if "transformers" in best:
            row["chunked_over_transformers"] = round(best["chunked"] / best["transformers"], 3)
            row["flash_over_transformers"] = round(best["flash"] / best["transformers"], 3)
            row["chunked_over_transformers_cpu"] = round(cpu["chunked"] / cpu["transformers"], 3)
        if args.threads == 1:   # one thread: the CPU time is the work's own time
            g = (fl["matrix"] + fl["attention_chunked"]) / cpu["chunked"] / 1e6
            row["gflops_per_cpu_s_chunked"] = round(g, 1)
            row["share_of_f32_matmul_rate_cpu"] = round(g / limits["f32_gflops"], 3)
            row["share_of_f16_matmul_rate_cpu"] = round(g / limits["f16_gflops"], 3)
            h = cpu.get("transformers")
            if h:
                row["transformers_gflops_per_cpu_s"] = round((fl["matrix"] + fl["attention"]) / h / 1e6, 1)
        rows.append(row)
    for m in models.values():
        m.close()
    write_report(args.out, dict(tool="bench_vision_attn", shape=SHAPE, model=str(path.name), threads=args.threads,
                                reps=args.reps, machine_limits=limits, rows=rows))
    print("| tiles | flash s (CPU s) | chunked s (CPU s) | transformers s (CPU s) | chunked / flash (CPU) | "
          "chunked / transformers (CPU) | GFLOP/s (share of f32 / f16 matmul) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        e, c = r["encode_ms"], r["cpu_ms"]
        cell = {k: f"{e[k] / 1000:.1f} ({c[k] / 1000:.1f})" for k in e}
        print(f"| {r['tiles']} | {cell['flash']} | {cell['chunked']} | {cell.get('transformers', '-')} | "
              f"{r['chunked_over_flash']:.2f} ({r['chunked_over_flash_cpu']:.2f}) | "
              f"{r.get('chunked_over_transformers', '-')} ({r.get('chunked_over_transformers_cpu', '-')}) | "
              f"{r['gflops_per_s_chunked']} ({r['share_of_f32_matmul_rate']:.2f} / {r['share_of_f16_matmul_rate']:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
