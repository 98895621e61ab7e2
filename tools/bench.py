#!/usr/bin/env python3
"""Benchmark pyvtrim with and without visual-token reduction on random-weight LLaVA-1.5 models of real shapes.

Speed does not depend on weight values, so the models are written with random weights (no download):
CLIP ViT-L/336 (24 layers, 1024 wide, 576 image tokens) + a TinyLlama-1.1B-shaped or 7B-shaped Llama,
with the real Llama-2 vocabulary. Each configuration runs in its own process (so peak RSS is its own),
one after the other in one run, same image, prompt and threads. Writes JSON and prints a Markdown table.

    python tools/bench.py                      # TinyLlama shape, f16, 2 threads
    python tools/bench.py --quick              # fewer decode tokens, one repetition
    python tools/bench.py --text 7b --outtype q8_0
    python tools/bench.py --ficoco               # FiCoCo-V at 192/128/64, + FastV, and its merge overhead

A configuration is a spec: "none", or policies joined by "+": "fastv:K:R", "ficoco_v:N[:START]",
"ficoco_l:N[:START]".
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

from bench_common import CLIP_L_336, TEXT_SHAPES, best_of_prefills, greedy_decode, vision_flops

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


def policies(pyvtrim, spec: str) -> list:
    """A spec as the list of policies it names (see the module docstring)."""
    out = []
    for part in ([] if spec == "none" else spec.split("+")):
        name, *args = part.split(":")
        if name == "fastv":
            out.append(pyvtrim.FastV(k=int(args[0]), ratio=float(args[1])))
        elif name in ("ficoco_v", "ficoco_l"):
            cls = getattr(pyvtrim, {"ficoco_v": "FiCoCoV", "ficoco_l": "FiCoCoL"}[name], None)
            if cls is None:
                raise SystemExit(f"bench: {name}: this pyvtrim has no such policy")
            kw = dict(tokens=int(args[0]))
            if len(args) > 1:
                kw["start_layer"] = int(args[1])
            out.append(cls(**kw))
        else:
            raise SystemExit(f"bench: unknown configuration {part!r}")
    return out


def run_one(path: str, reduce_spec: str, threads: int, n_decode: int, reps: int) -> dict:
    """One configuration, in this process; reduce_spec as policies() reads it."""
    import resource

    import pyvtrim

    reduce = policies(pyvtrim, reduce_spec)
    img = bench_image()
    with pyvtrim.Model(path, n_ctx=2048, n_threads=threads) as m:
        ids = m.tokenize(m.chat_prompt(PROMPT, 1))
        best, logits = best_of_prefills(m, ids, [img], reduce, reps)
        # decode: greedy continuation of the last prefill, ignoring end-of-generation
        best["decode_tok_s"] = n_decode / greedy_decode(m, logits, n_decode)
        best["kv_cache_bytes_after_decode"] = m.last_stats["kv_cache_bytes"]
        info = m.info
    best["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    best["n_layer"] = info["n_layer"]
    # FLOPs: the decoder's (the runtime's estimate) and the vision tower's (same formulas: full minus what
    # the encoder stages say they saved in the tower, i.e. their flops_saved less their decoder share)
    v_full = vision_flops(CLIP_L_336, info["n_image_tokens"], info["n_embd"])
    decoder_saved = best["prefill_flops_full"] - best["prefill_flops"]
    other = sum(s["flops_saved"] for s in best["stages"] if s["hook"] != "vision_encoder")
    enc = sum(s["flops_saved"] for s in best["stages"] if s["hook"] == "vision_encoder")
    best["vision_flops_full"] = v_full
    best["vision_flops"] = v_full - (enc - (decoder_saved - other) if enc else 0.0)
    best["flops_total"] = best["vision_flops"] + best["prefill_flops"]
    best["flops_total_full"] = v_full + best["prefill_flops_full"]
    return best


FICOCO_L = ",ficoco_l:64"
OVERHEAD = ",ficoco_v:576,ficoco_v:565"   # all steps, no drop; one patch a step (11 steps): the merge overhead


def merge_overhead(results: list) -> dict:
    """FiCoCo-V's own cost in the tower: ficoco_v:576 runs every step (graph split, logit matrix) and drops
    nothing; ficoco_v:565 also ranks, correlates and merges one patch a step. Against the unreduced encode,
    the latter's small saving from 11 fewer rows is added back by its FLOPs share."""
    by = {r["config"]: r for r in results}
    base, probe, step = by["none"], by.get("ficoco_v:576"), by.get("ficoco_v:565")
    if not probe or not step:
        return {}
    saved_share = 1.0 - step["vision_flops"] / step["vision_flops_full"]
    step_cost = step["encode_ms"] - base["encode_ms"] * (1.0 - saved_share)
    return dict(encode_ms_unreduced=base["encode_ms"], probe_only_ms=probe["encode_ms"] - base["encode_ms"],
                scores_and_merges_ms=step_cost, share=step_cost / base["encode_ms"], target_share=0.05)


def print_fastv(results: list) -> None:
    print("| config | image tokens kept | encode ms | prefill ms (ratio) | TTFT ms (ratio) | decode tok/s | "
          "KV MiB (ratio) | KV layers >= K ratio | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['n_image_tokens_kept']}/{r['n_image_tokens']} | {r['encode_ms']:.0f} | "
              f"{r['prefill_ms']:.0f} ({r['prefill_ratio']:.2f}) | {r['ttft_ms']:.0f} ({r['ttft_ratio']:.2f}) | "
              f"{r['decode_tok_s']:.2f} | {r['kv_cache_bytes'] / 2**20:.1f} ({r['kv_ratio']:.2f}) | "
              f"{r.get('kv_ratio_layers_ge_k', 1.0):.2f} | {r['peak_rss_mib']:.0f} |")


def print_ficoco(results: list, overhead: dict) -> None:
    print("| config | image tokens kept | encode ms (ratio) | prefill ms (ratio) | TTFT ms (ratio) | decode tok/s | "
          "KV MiB (ratio) | GFLOPs vision + LLM (ratio) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["config"] in ("ficoco_v:576", "ficoco_v:565"):
            continue
        print(f"| {r['config']} | {r['n_image_tokens_kept']}/{r['n_image_tokens']} | "
              f"{r['encode_ms']:.0f} ({r['encode_ratio']:.2f}) | {r['prefill_ms']:.0f} ({r['prefill_ratio']:.2f}) | "
              f"{r['ttft_ms']:.0f} ({r['ttft_ratio']:.2f}) | {r['decode_tok_s']:.2f} | "
              f"{r['kv_cache_bytes'] / 2**20:.1f} ({r['kv_ratio']:.2f}) | "
              f"{r['vision_flops'] / 1e9:.0f} + {r['prefill_flops'] / 1e9:.0f} ({r['flops_ratio']:.3f}) |")
    if overhead:
        print(f"\nmerge overhead: logit matrix + splits {overhead['probe_only_ms']:.0f} ms, with scores and merges "
              f"{overhead['scores_and_merges_ms']:.0f} ms = {100 * overhead['share']:.1f}% of the unreduced "
              f"encode ({overhead['encode_ms_unreduced']:.0f} ms; target <= 5%)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", choices=sorted(TEXT_SHAPES), default="tinyllama")
    ap.add_argument("--outtype", choices=["f16", "q8_0", "f32"], default="f16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32, help="decode tokens per configuration")
    ap.add_argument("--reps", type=int, default=2, help="prefills per configuration (the fastest counts)")
    ap.add_argument("--quick", action="store_true", help="8 decode tokens, one prefill")
    ap.add_argument("--configs", default=None, help="comma-separated specs (default: none,fastv:2:0.5,fastv:2:0.75)")
    ap.add_argument("--out", default=None, help="default: bench/results/fastv.json (ficoco.json with --ficoco)")
    ap.add_argument("--ficoco", action="store_true", help="the FiCoCo configurations and the merge overhead")
    ap.add_argument("--one", help=argparse.SUPPRESS)       # internal: run one configuration, print JSON
    args = ap.parse_args(argv)
    if args.quick:
        args.decode, args.reps = 8, 1
    if args.one:
        print(json.dumps(run_one(args.one.split("|")[0], args.one.split("|")[1], args.threads, args.decode,
                                 args.reps)))
        return 0

    if args.configs is None:
        args.configs = ("none,ficoco_v:192,ficoco_v:128,ficoco_v:64,ficoco_v:64+fastv:2:0.5" + FICOCO_L + OVERHEAD
                        if args.ficoco else "none,fastv:2:0.5,fastv:2:0.75")
    if args.out is None:
        args.out = "bench/results/ficoco.json" if args.ficoco else "bench/results/fastv.json"
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
    overhead = merge_overhead(results) if args.ficoco else None
    for r in results:
        r["prefill_ratio"] = r["prefill_ms"] / base["prefill_ms"]
        r["ttft_ratio"] = r["ttft_ms"] / base["ttft_ms"]
        r["kv_ratio"] = r["kv_cache_bytes"] / base["kv_cache_bytes"]
        r["encode_ratio"] = r["encode_ms"] / base["encode_ms"]
        r["flops_ratio"] = r["flops_total"] / r["flops_total_full"]
        if r["stages"]:
            s = r["stages"][0]
            r["kv_ratio_layers_ge_k"] = s["kv_bytes_kept"] / s["kv_bytes_full"]
    report = dict(model=str(path.name), text_shape=args.text, outtype=args.outtype, threads=args.threads,
                  machine=platform.machine(), cpu_count=os.cpu_count(), load_avg=os.getloadavg(), results=results)
    if overhead:
        report["merge_overhead"] = overhead
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    print(f"\n{path.name}, {args.threads} threads\n")
    if args.ficoco:
        print_ficoco(results, overhead)
    else:
        print_fastv(results)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
