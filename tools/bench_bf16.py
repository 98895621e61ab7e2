#!/usr/bin/env python3
"""bf16 weights against f16 on the LLaVA-1.5 TinyLlama shape, paired in one process, with each figure's share of
what this machine sustains.

The f16 model is tools/bench.py's random-weight one; the bf16 file is made from it by pyvtrim.quantize (the same
bits as the converter's --outtype bf16). Both models are loaded once; each round prefills the same image and
prompt on one, then the other (time to first token, encode, prefill), then decodes `--decode` greedy tokens on
each. Interleaving keeps a drifting machine out of the ratios; the fastest round counts. The process's CPU
time is recorded too (with --threads 1 it is the work's own time, steady on a machine shared with other jobs,
and vtrim_measure_machine then measures its rates the same way).

Share of limit (vtrim_measure_machine, same threads, measured at the start): the prefill's FLOPs (vision tower
+ decoder, the runtime's estimates) per second of TTFT over the matrix-product rate of the weights' type, and a
decode step's bytes (weights + KV cache read once) per second over the copy bandwidth.

    python tools/bench_bf16.py                        # 2 threads, 3 rounds; writes bench/results/bf16.json
    python tools/bench_bf16.py --threads 1 --rounds 2 --decode 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import PROMPT, bench_image, model_path  # noqa: E402
from bench_common import CLIP_L_336, greedy_decode, machine_limits, vision_flops, write_report  # noqa: E402


def bf16_path(f16: Path) -> Path:
    import pyvtrim

    out = f16.with_name(f16.name.replace("-f16.gguf", "-bf16.gguf"))
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        pyvtrim.quantize(str(f16), str(tmp), "bf16", vision_type="same")
        tmp.rename(out)
    return out


def one_round(m, ids, img, n_decode: int) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    logits = m.forward(ids, [img])
    ttft, ttft_cpu = (time.perf_counter() - t0) * 1000.0, (time.process_time() - c0) * 1000.0
    st = m.last_stats
    c0 = time.process_time()
    dt = greedy_decode(m, logits, n_decode)
    return dict(ttft_ms=ttft, ttft_cpu_ms=ttft_cpu, encode_ms=st["t_encode_ms"], prefill_ms=st["t_prefill_ms"],
                prefill_flops=st["prefill_flops"], kv_cache_bytes=m.last_stats["kv_cache_bytes"],
                decode_tok_s=n_decode / dt, decode_tok_cpu_s=n_decode / (time.process_time() - c0))


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
            for x in ("ttft_ms", "ttft_cpu_ms", "encode_ms", "prefill_ms"):
                b[x] = min(b[x], got[x])
            for x in ("decode_tok_s", "decode_tok_cpu_s"):
                b[x] = max(b[x], got[x])
        print(f"round {r + 1}: " + ", ".join(f"{k} TTFT {v['ttft_ms']:.0f} ms, {v['decode_tok_s']:.2f} tok/s"
                                            for k, v in best.items()), file=sys.stderr, flush=True)
    rows = []
    for k, m in models.items():
        b, mem, info = best[k], m.memory(), m.info
        weights = sum(v for n, v in mem.items() if n in ("weights_text", "weights_vision", "weights_projector"))
        flops = vision_flops(CLIP_L_336, info["n_image_tokens"], info["n_embd"]) + b["prefill_flops"]
        t = b["ttft_cpu_ms"] if args.threads == 1 else b["ttft_ms"]
        b.update(weights=k, weight_bytes=weights, prefill_gflops_per_s=round(flops / t / 1e6, 1))
        b["share_of_matmul_rate"] = round(b["prefill_gflops_per_s"] / limits[f"{k}_gflops"], 3)
        step_bytes = mem["weights_text"] + b["kv_cache_bytes"]
        rate = b["decode_tok_cpu_s"] if args.threads == 1 else b["decode_tok_s"]
        b["decode_gb_per_s"] = round(step_bytes * rate / 1e9, 2)
        b["share_of_copy_bandwidth"] = round(b["decode_gb_per_s"] / limits["copy_gb_per_s"], 3)
        rows.append(b)
        m.close()
    f, h = rows
    report = dict(tool="bench_bf16", model=f16.name, threads=args.threads, rounds=args.rounds, decode=args.decode,
                  machine_limits=limits, rows=rows,
                  bf16_over_f16=dict(ttft=round(h["ttft_ms"] / f["ttft_ms"], 3),
                                     decode_tok_s=round(h["decode_tok_s"] / f["decode_tok_s"], 3),
                                     ttft_cpu=round(h["ttft_cpu_ms"] / f["ttft_cpu_ms"], 3),
                                     decode_tok_cpu_s=round(h["decode_tok_cpu_s"] / f["decode_tok_cpu_s"], 3)))
    write_report(args.out, report)
    print("| weights | encode ms | prefill ms | TTFT ms (CPU ms) | prefill GFLOP/s (share of matmul rate) | "
          "decode tok/s (per CPU s) | decode GB/s (share of copy bandwidth) |")
    print("|---|---|---|---|---|---|---|")
    for b in rows:
        print(f"| {b['weights']} | {b['encode_ms']:.0f} | {b['prefill_ms']:.0f} | {b['ttft_ms']:.0f} "
              f"({b['ttft_cpu_ms']:.0f}) | {b['prefill_gflops_per_s']} ({b['share_of_matmul_rate']:.2f}) | "
              f"{b['decode_tok_s']:.2f} ({b['decode_tok_cpu_s']:.2f}) | "
              f"{b['decode_gb_per_s']} ({b['share_of_copy_bandwidth']:.2f}) |")
    r = report["bf16_over_f16"]
    print(f"bf16 / f16: TTFT {r['ttft']}x (CPU {r['ttft_cpu']}x), decode {r['decode_tok_s']}x "
          f"(CPU {r['decode_tok_cpu_s']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
