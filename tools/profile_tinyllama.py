#!/usr/bin/env python3
"""Where a prefill's and a decode step's time goes, on the LLaVA-1.5 TinyLlama shape (random weights, f16):
Linux perf samples (the cpu-clock event, which needs no hardware counters) of one phase at a time, grouped by
what the samples ran (ggml's matrix kernels, its other ops, the runtime, Python).

The script starts `perf record` on itself with recording paused, and enables it only around the phase named:
the model load and the other phase are not in the profile. Writes the grouped shares as JSON and prints them.

    python tools/profile_tinyllama.py --phase prefill          # one prefill of the image and prompt
    python tools/profile_tinyllama.py --phase decode --steps 32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (group, pattern on the symbol) in order: the first match names a sample's group
GROUPS = [
    ("matrix kernels (tinyBLAS / sgemm)", r"tinyBLAS|sgemm|llamafile"),
    ("matrix products, other paths (vec_dot, conversion of activations)",
     r"vec_dot|mul_mat|quantize_row|from_float|fp32_to_fp16|fp16_to_fp32|gemm|gemv"),
    ("attention (flash kernel, softmax)", r"flash_attn|soft_max"),
    ("norms", r"norm"),
    ("element-wise (add, mul, GELU, SiLU, RoPE, scale)",
     r"_add|_mul\b|gelu|silu|swiglu|sigmoid|rope|scale|vec_mad|unary|expf"),
    ("copies and layout (cpy, cont, concat, get_rows, im2col, memset)",
     r"cpy|dup|cont\b|concat|get_rows|im2col|memcpy|memmove|memset|set_rows"),
    ("thread synchronisation", r"barrier|\bomp_|gomp|sched_yield|futex|pthread_|graph_compute_thread"),
    ("kernel (page faults, scheduling)", r"^\[k\]"),
    ("Python", r"^_?Py|python"),
]


def classify(sym: str) -> str:
    for name, pat in GROUPS:
        if re.search(pat, sym, re.IGNORECASE):
            return name
    return "other"


def child(args) -> int:
    import pyvtrim
    from bench import PROMPT, bench_image, model_path
    from bench_common import greedy_decode

    ctl, ack = open(args.ctl, "w"), open(args.ack, "r")

    def perf(cmd: str) -> None:
        ctl.write(cmd + "\n")
        ctl.flush()
        ack.readline()

    img = bench_image()
    with pyvtrim.Model(str(model_path("tinyllama", "f16")), n_ctx=2048, n_threads=args.threads,
                       image_cache_mib=0) as m:
        ids = m.tokenize(m.chat_prompt(PROMPT, 1))
        logits = m.forward(ids, [img])              # warm-up: pages in the weights, sizes the buffers
        if args.phase == "prefill":
            perf("enable")
            t0 = time.perf_counter()
            m.forward(ids, [img])
            dt = time.perf_counter() - t0
            perf("disable")
        else:
            greedy_decode(m, logits, 2)
            perf("enable")
            dt = greedy_decode(m, m.logits(), args.steps)
            perf("disable")
        print(json.dumps(dict(seconds=dt, stats={k: m.last_stats[k] for k in ("t_encode_ms", "t_prefill_ms",
                                                                                 "n_prompt_tokens")})))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=("prefill", "decode"), default="prefill")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default: bench/results/profile-<phase>.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ctl", help=argparse.SUPPRESS)
    ap.add_argument("--ack", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        ctl, ack, data = (os.path.join(tmp, n) for n in ("ctl", "ack", "perf.data"))
        os.mkfifo(ctl)
        os.mkfifo(ack)
        cmd = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-D", "-1", f"--control=fifo:{ctl},{ack}",
               "-o", data, "--", sys.executable, __file__, "--child", "--phase", args.phase, "--steps",
               str(args.steps), "--threads", str(args.threads), "--ctl", ctl, "--ack", ack]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stdout, run.stderr, file=sys.stderr)
            return run.returncode
        measured = json.loads(run.stdout.strip().splitlines()[-1])
        rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "sym",
                              "--percent-limit", "0"], capture_output=True, text=True, check=True).stdout
    shares: dict = {}
    top = []
    for line in rep.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\[.\])\s+(.*\S)", line)
        if not m:
            continue
        pct, kind, sym = float(m.group(1)), m.group(2), m.group(3)
        group = classify("[k]" if kind == "[k]" else sym)
        shares[group] = shares.get(group, 0.0) + pct
        if len(top) < 40:
            top.append(dict(share=pct, symbol=sym))
    report = dict(tool="profile_tinyllama", phase=args.phase, threads=args.threads, steps=args.steps,
                  measured=measured, groups={k: round(v, 1) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
                  top_symbols=top)
    out = Path(args.out or f"bench/results/profile-{args.phase}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.phase}: {measured['seconds']:.2f} s")
    for k, v in report["groups"].items():
        print(f"  {v:5.1f}%  {k}")
    print("top symbols:")
    for t in top[:15]:
        print(f"  {t['share']:5.1f}%  {t['symbol']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
