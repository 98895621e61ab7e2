#!/usr/bin/env python3
"""Benchmark VL-Cache where the KV cache matters: many images, a multi-head-attention Llama, long decoding.

A random-weight LLaVA (speed does not depend on weight values): a ~1B Llama with multi-head attention (16
layers, 2048 wide, 32 heads = 32 KV heads, ff 5632, Llama-2 vocabulary), q8_0 weights, f16 KV cache; a small
CLIP (2 layers, 64 wide) at 336 px / patch 14, so each image still gives 576 tokens but the 16 encodes stay
cheap (the tower's cost is not what this measures). One prompt of 16 images (~9.2k positions), 128 decoded
tokens.

Every configuration ("none", "vlcache:B") is one Model in this process, prefilled with the same prompt (TTFT,
the VL-Cache stage's own time, KV bytes), then decoded side by side: single steps interleaved (A B C, C B A,
...), so that whatever else slows the machine down lands on every configuration alike; the speed ratio is
the median over rounds of the paired step times.

    python tools/bench_vlcache.py                          # the issue's configuration (minutes of CPU)
    python tools/bench_vlcache.py --text 512-mha --images 4 --out bench/results/vlcache-512.json
    python tools/bench_vlcache.py --quick                  # 2 images, 16 steps, a 4-layer 512-wide model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

PROMPT = "Compare these pictures one by one, then describe what they have in common."

TEXT_SHAPES = {
    # the issue's: ~1B, multi-head attention (as LLaVA-1.5-7B's Vicuna), head_dim 64
    "1b-mha": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=32, max_position_embeddings=16384),
    # the same depth and head_dim at a quarter of the width (~70M): with 4 images its KV cache is to its weights
    # what 16 images are to the 1B's (f16 KV bytes / q8_0 layer bytes ~ 4 n / (13 d), ~1.4 for both)
    "512-mha": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=16, num_attention_heads=8,
                    num_key_value_heads=8, max_position_embeddings=16384),
    "quick": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=16384),
}
# 336 px / patch 14: 576 image tokens, as CLIP ViT-L/336 gives LLaVA-1.5, at a fraction of its cost.
SMALL_CLIP_336 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      image_size=336, patch_size=14)


def model_path(text: str, outtype: str) -> Path:
    from pyvtrim.demo import DEMO_CONFIG, cache_dir, write_demo_model

    name = f"llava-smallclip336-{text}-{outtype}.gguf"
    path = cache_dir() / "bench" / name
    if not path.is_file():
        cfg = json.loads(json.dumps(DEMO_CONFIG))
        cfg["text_config"].update(TEXT_SHAPES[text])
        cfg["vision_config"].update(SMALL_CLIP_336)
        cfg["vision_config"]["projection_dim"] = cfg["text_config"]["hidden_size"]
        t0 = time.time()
        print(f"writing {path} (random weights) ...", file=sys.stderr)
        write_demo_model(path, outtype=outtype, config=cfg)
        print(f"  done in {time.time() - t0:.0f} s", file=sys.stderr)
    return path


def images(n: int) -> list:
    import numpy as np

    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, size=(336 + 8 * i, 448 - 4 * i, 3), dtype=np.uint8) for i in range(n)]


def parse_spec(spec: str):
    import pyvtrim

    if spec == "none":
        return None
    name, budget = spec.split(":")
    assert name == "vlcache", spec
    return pyvtrim.VLCache(budget=float(budget))


def run(path: Path, specs: list, n_images: int, threads: int, n_decode: int) -> dict:
    import numpy as np

    import pyvtrim

    imgs = images(n_images)
    models = []
    results = []
    try:
        for spec in specs:
            m = pyvtrim.Model(path, n_ctx=n_images * 576 + 256 + n_decode, n_threads=threads, kv_type="f16")
            models.append(m)
            ids = m.tokenize(m.chat_prompt(PROMPT, n_images))
            t0 = time.perf_counter()
            logits = m.forward(ids, imgs, reduce=parse_spec(spec))
            ttft = (time.perf_counter() - t0) * 1000.0
            st = m.last_stats
            stage = next((s for s in st["stages"] if s["method"] == "vlcache"), None)
            results.append(dict(config=spec, ttft_ms=ttft, encode_ms=st["t_encode_ms"], prefill_ms=st["t_prefill_ms"],
                                n_positions=st["n_prompt_tokens"], kv_cache_bytes=st["kv_cache_bytes"],
                                stage=stage, first_token=int(np.argmax(logits))))
            print(f"{spec}: ttft {ttft / 1000:.1f} s (prefill {st['t_prefill_ms'] / 1000:.1f} s"
                  f"{', stage %.0f ms' % stage['t_ms'] if stage else ''}), KV {st['kv_cache_bytes'] / 2**20:.0f} MiB",
                  file=sys.stderr)
        toks = [r["first_token"] for r in results]
        steps = [[] for _ in specs]
        for r in range(n_decode):
            order = range(len(specs)) if r % 2 == 0 else reversed(range(len(specs)))
            for i in order:
                t0 = time.perf_counter()
                toks[i] = int(np.argmax(models[i].decode(toks[i])))
                steps[i].append(time.perf_counter() - t0)
        for r, m in zip(results, models):
            r["kv_cache_bytes_after_decode"] = m.last_stats["kv_cache_bytes"]
        info = models[0].info
    finally:
        for m in models:
            m.close()
    base = results[0]
    base_steps = np.array(steps[0])
    for r, x in zip(results, steps):
        x = np.array(x)
        r["decode_tok_s_median"] = 1.0 / float(np.median(x))
        r["decode_paired_speed_ratio_median"] = float(np.median(base_steps / x))
        r["decode_step_ms"] = [round(t * 1000.0, 1) for t in x]
        r["kv_ratio"] = r["kv_cache_bytes"] / base["kv_cache_bytes"]
        r["ttft_ratio"] = r["ttft_ms"] / base["ttft_ms"]
        r["stage_share_of_ttft"] = (r["stage"]["t_ms"] / r["ttft_ms"]) if r["stage"] else 0.0
    return dict(n_layer=info["n_layer"], n_embd=info["n_embd"], n_head=info["n_head"], n_head_kv=info["n_head_kv"],
                n_params=info["n_params"], n_images=n_images, n_decode=n_decode, results=results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", choices=sorted(TEXT_SHAPES), default="1b-mha")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--outtype", choices=["q8_0", "f16", "f32"], default="q8_0")
    ap.add_argument("--configs", default="none,vlcache:0.1,vlcache:0.2")
    ap.add_argument("--quick", action="store_true", help="2 images, 16 steps, a 4-layer 512-wide model")
    ap.add_argument("--out", default=None, help="JSON report (default bench/results/vlcache.json; --quick: none)")
    args = ap.parse_args(argv)
    if args.quick:
        args.text, args.images, args.decode = "quick", 2, 16
    path = model_path(args.text, args.outtype)
    report = run(path, args.configs.split(","), args.images, args.threads, args.decode)
    report.update(model=path.name, text_shape=args.text, outtype=args.outtype, threads=args.threads,
                  machine=platform.machine(),
                  cpu_count=os.cpu_count(), peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    out = args.out or (None if args.quick else "bench/results/vlcache.json")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))

    print(f"\n{path.name}: {report['n_layer']} layers, {report['n_embd']} wide, {report['n_head_kv']} KV heads, "
          f"{report['n_images']} images, {report['n_decode']} decode steps interleaved, {args.threads} threads\n")
    print("| config | positions | KV MiB (ratio) | TTFT s (ratio) | VL-Cache stage ms (share of TTFT) | "
          "decode tok/s (median step) | decode speed vs none (paired median) |")
    print("|---|---|---|---|---|---|---|")
    for r in report["results"]:
        stage = f"{r['stage']['t_ms']:.0f} ({100 * r['stage_share_of_ttft']:.2f}%)" if r["stage"] else "-"
        print(f"| {r['config']} | {r['n_positions']} | {r['kv_cache_bytes'] / 2**20:.0f} ({r['kv_ratio']:.3f}) | "
              f"{r['ttft_ms'] / 1000:.1f} ({r['ttft_ratio']:.3f}) | {stage} | {r['decode_tok_s_median']:.2f} | "
              f"{r['decode_paired_speed_ratio_median']:.2f} |")
    if out:
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
