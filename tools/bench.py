#!/usr/bin/env python3
"""Benchmark pyvtrim with and without visual-token reduction on random-weight LLaVA-1.5 models of real shapes.

Speed does not depend on weight values, so the models are written with random weights (no download):
CLIP ViT-L/336 (24 layers, 1024 wide, 576 image tokens) + a TinyLlama-1.1B-shaped or 7B-shaped Llama,
with the real Llama-2 vocabulary. Each configuration runs in its own process (so peak RSS is its own),
one after the other in one run, same image, prompt and threads. Writes JSON and prints a Markdown table.

    python tools/bench.py                      # TinyLlama shape, f16, 2 threads
    python tools/bench.py --quick              # fewer decode tokens, one repetition
    python tools/bench.py --text 7b --outtype q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_common import CLIP_L_336, TEXT_SHAPES, best_of_prefills

PROMPT = "Describe this picture in detail, then list every object you can see."


def bench_config(text: str) -> dict:
    from pyvtrim.demo import DEMO_CONFIG

    cfg = json.loads(json.dumps(DEMO_CONFIG))
    cfg["text_config"].update(TEXT_SHAPES[text])
    cfg["vision_config"].update(CLIP_L_336)
    cfg["vision_config"]["projection_dim"] = cfg["text_config"]["hidden_size"]
    return cfg


def model_path(text: str, outtype: str) -> Path:
    from pyvtrim.demo import cache_dir, write_demo_model

    path = cache_dir() / "bench" / f"llava-clipL336-{text}-{outtype}.gguf"
    if not path.is_file():
        t0 = time.time()
        print(f"writing {path} (random weights) ...", file=sys.stderr)
        write_demo_model(path, outtype=outtype, config=bench_config(text))
        print(f"  done in {time.time() - t0:.0f} s", file=sys.stderr)
    return path


def bench_image():
    import numpy as np

    y, x = np.mgrid[0:480, 0:640]
    img = np.stack([(x * 255 // 639), (y * 255 // 479), ((x + y) % 256)], axis=-1).astype(np.uint8)
    return img


def run_one(path: str, reduce_spec: str, threads: int, n_decode: int, reps: int) -> dict:
    """One configuration, in this process. reduce_spec: "none", "fastv:K:R" or "ficoco_l:N[:L]"."""
    import resource

    import numpy as np

    import pyvtrim

    reduce = None
    if reduce_spec.startswith("fastv:"):
        _, k, r = reduce_spec.split(":")
        reduce = pyvtrim.FastV(k=int(k), ratio=float(r))
    elif reduce_spec.startswith("ficoco_l:"):
        n, *start = reduce_spec.split(":")[1:]
        reduce = pyvtrim.FiCoCoL(tokens=int(n), start_layer=int(start[0]) if start else 4)
    img = bench_image()
    with pyvtrim.Model(path, n_ctx=2048, n_threads=threads) as m:
        ids = m.tokenize(m.chat_prompt(PROMPT, 1))
        best, logits = best_of_prefills(m, ids, [img], reduce, reps)
        # decode: greedy continuation of the last prefill, ignoring end-of-generation
        tok = int(np.argmax(logits))
        t0 = time.perf_counter()
        for _ in range(n_decode):
            m.decode(tok)
            tok = int(np.argmax(m.logits()))
        dt = time.perf_counter() - t0
        best["decode_tok_s"] = n_decode / dt
        best["kv_cache_bytes_after_decode"] = m.last_stats["kv_cache_bytes"]
        info = m.info
    best["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    best["n_layer"] = info["n_layer"]
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", choices=sorted(TEXT_SHAPES), default="tinyllama")
    ap.add_argument("--outtype", choices=["f16", "q8_0", "f32"], default="f16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32, help="decode tokens per configuration")
    ap.add_argument("--reps", type=int, default=2, help="prefills per configuration (the fastest counts)")
    ap.add_argument("--quick", action="store_true", help="8 decode tokens, one prefill")
    ap.add_argument("--configs", default="none,fastv:2:0.5,fastv:2:0.75")
    ap.add_argument("--out", default="bench/results/fastv.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)       # internal: run one configuration, print JSON
    args = ap.parse_args(argv)
    if args.quick:
        args.decode, args.reps = 8, 1
    if args.one:
        print(json.dumps(run_one(args.one.split("|")[0], args.one.split("|")[1], args.threads, args.decode,
                                 args.reps)))
        return 0

    path = model_path(args.text, args.outtype)
    results = []
    for spec in args.configs.split(","):
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--decode", str(args.decode),
               "--reps", str(args.reps), "--one", f"{path}|{spec}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        r["config"] = spec
        results.append(r)
        print(f"{spec}: ttft {r['ttft_ms']:.0f} ms (encode {r['encode_ms']:.0f}, prefill {r['prefill_ms']:.0f}), "
              f"decode {r['decode_tok_s']:.2f} tok/s", file=sys.stderr)

    base = results[0]
    for r in results:
        r["prefill_ratio"] = r["prefill_ms"] / base["prefill_ms"]
        r["ttft_ratio"] = r["ttft_ms"] / base["ttft_ms"]
        r["kv_ratio"] = r["kv_cache_bytes"] / base["kv_cache_bytes"]
        if r["stages"]:
            s = r["stages"][0]
            r["kv_ratio_layers_ge_k"] = s["kv_bytes_kept"] / s["kv_bytes_full"]
    report = dict(model=str(path.name), text_shape=args.text, outtype=args.outtype, threads=args.threads,
                  machine=platform.machine(), cpu_count=os.cpu_count(), results=results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    print(f"\n{path.name}, {args.threads} threads\n")
    print("| config | image tokens kept | encode ms | prefill ms (ratio) | TTFT ms (ratio) | decode tok/s | "
          "KV MiB (ratio) | KV layers >= K ratio | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['n_image_tokens_kept']}/{r['n_image_tokens']} | {r['encode_ms']:.0f} | "
              f"{r['prefill_ms']:.0f} ({r['prefill_ratio']:.2f}) | {r['ttft_ms']:.0f} ({r['ttft_ratio']:.2f}) | "
              f"{r['decode_tok_s']:.2f} | {r['kv_cache_bytes'] / 2**20:.1f} ({r['kv_ratio']:.2f}) | "
              f"{r.get('kv_ratio_layers_ge_k', 1.0):.2f} | {r['peak_rss_mib']:.0f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
