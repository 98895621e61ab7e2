#!/usr/bin/env python3
"""bf16 weights against f16 on the LLaVA-1.5 TinyLlama shape, paired in one process, with each figure's share of
what this machine sustains.

The f16 model is tools/bench.py's random-weight one; the bf16 file is made from it by pyvtrim.quantize (the same
bits as the converter's --outtype bf16). Both models are loaded once; each round prefills the same image and
prompt on one, then the other (time to first token, encode, prefill), then decodes `--decode` greedy tokens on
each. Interleaving keeps a drifting machine out of the ratios; the fastest round counts.

Share of limit (vtrim_measure_machine, same threads, measured at the start): the prefill's FLOPs (vision tower
+ decoder, the runtime's estimates) per second of TTFT over the matrix-product rate of the weights' type, and a
decode step's bytes (weights + KV cache read once) per second over the copy bandwidth.

    python tools/bench_bf16.py                        # 2 threads, 3 rounds; writes bench/results/bf16.json
    python tools/bench_bf16.py --threads 1 --rounds 2 --decode 8
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

from bench import PROMPT, bench_image, model_path  # noqa: E402
from bench_common import CLIP_L_336, machine_limits, vision_flops  # noqa: E402


def bf16_path(f16: Path) -> Path:
    import pyvtrim

    out = f16.with_name(f16.name.replace("-f16.gguf", "-bf16.gguf"))
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        pyvtrim.quantize(str(f16), str(tmp), "bf16", vision_type="same")
        tmp.rename(out)
    return out


def one_round(m, ids, img, n_decode: int) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    logits = m.forward(ids, [img])
    ttft = (time.perf_counter() - t0) * 1000.0
    st = m.last_stats
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(n_decode):
        m.decode(tok)
        tok = int(np.argmax(m.logits()))
    dt = time.perf_counter() - t0
    return dict(ttft_ms=ttft, encode_ms=st["t_encode_ms"], prefill_ms=st["t_prefill_ms"],
                prefill_flops=st["prefill_flops"], kv_cache_bytes=m.last_stats["kv_cache_bytes"],
                decode_tok_s=n_decode / dt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--out", default="bench/results/bf16.json")
    args = ap.parse_args(argv)

    import pyvtrim

    f16 = model_path("tinyllama", "f16")
    paths = {"f16": f16, "bf16": bf16_path(f16)}
    limits = machine_limits(args.threads)
    print(f"machine: {limits}", file=sys.stderr, flush=True)
    img = bench_image()
    models = {k: pyvtrim.Model(str(p), n_ctx=2048, n_threads=args.threads, image_cache_mib=0) for k, p in paths.items()}
    ids = models["f16"].tokenize(models["f16"].chat_prompt(PROMPT, 1))
    best: dict = {}
    for r in range(args.rounds):
        for k, m in models.items():
            got = one_round(m, ids, img, args.decode)
            b = best.setdefault(k, dict(got))
            b["ttft_ms"], b["encode_ms"], b["prefill_ms"] = (min(b[x], got[x]) for x in ("ttft_ms", "encode_ms",
                                                                                         "prefill_ms"))
            b["decode_tok_s"] = max(b["decode_tok_s"], got["decode_tok_s"])
        print(f"round {r + 1}: " + ", ".join(f"{k} TTFT {v['ttft_ms']:.0f} ms, {v['decode_tok_s']:.2f} tok/s"
                                            for k, v in best.items()), file=sys.stderr, flush=True)
    rows = []
    for k, m in models.items():
        b, mem, info = best[k], m.memory(), m.info
        weights = sum(v for n, v in mem.items() if n in ("weights_text", "weights_vision", "weights_projector"))
        flops = vision_flops(CLIP_L_336, info["n_image_tokens"], info["n_embd"]) + b["prefill_flops"]
        b.update(weights=k, weight_bytes=weights, prefill_gflops_per_s=round(flops / b["ttft_ms"] / 1e6, 1))
        b["share_of_matmul_rate"] = round(b["prefill_gflops_per_s"] / limits[f"{k}_gflops"], 3)
        step_bytes = mem["weights_text"] + b["kv_cache_bytes"]
        b["decode_gb_per_s"] = round(step_bytes * b["decode_tok_s"] / 1e9, 2)
        b["share_of_copy_bandwidth"] = round(b["decode_gb_per_s"] / limits["copy_gb_per_s"], 3)
        rows.append(b)
        m.close()
    f, h = rows
    report = dict(tool="bench_bf16", model=f16.name, threads=args.threads, rounds=args.rounds, decode=args.decode,
                  machine_limits=limits, machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
                  date=time.strftime("%Y-%m-%d %H:%M"), rows=rows,
                  bf16_over_f16=dict(ttft=round(h["ttft_ms"] / f["ttft_ms"], 3),
                                     decode_tok_s=round(h["decode_tok_s"] / f["decode_tok_s"], 3)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("| weights | encode ms | prefill ms | TTFT ms | prefill GFLOP/s (share of matmul rate) | decode tok/s | "
          "decode GB/s (share of copy bandwidth) |")
    print("|---|---|---|---|---|---|---|")
    for b in rows:
        print(f"| {b['weights']} | {b['encode_ms']:.0f} | {b['prefill_ms']:.0f} | {b['ttft_ms']:.0f} | "
              f"{b['prefill_gflops_per_s']} ({b['share_of_matmul_rate']:.2f}) | {b['decode_tok_s']:.2f} | "
              f"{b['decode_gb_per_s']} ({b['share_of_copy_bandwidth']:.2f}) |")
    print(f"bf16 / f16: TTFT {report['bf16_over_f16']['ttft']}x, decode {report['bf16_over_f16']['decode_tok_s']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
