#!/usr/bin/env python3
"""Memory-mapped weights against weights read into the heap: load time, memory, decode speed.

The model is bench.py's TinyLlama-shaped LLaVA-1.5 (CLIP ViT-L/336 + a 22-layer 2048-wide Llama, random
weights) quantized here to q8_0 with `pyvtrim.quantize` (the file is cached next to the f16 one), or with
--text 7b its 7B-shaped one (32 x 4096) written as q8_0 by the converter. Each
load is measured in a fresh child process, alternating the two ways (mmap, heap, mmap, heap, ...): wall time
of `Model(...)`, the anonymous and file-backed resident memory after it, and the peak resident set after a
short prefill and 16 decode steps. The page cache is warm for every load but the first (the file was just
written or read): these are the figures of a second start, not a cold disk. Decode speed: both models in one
process, one step each in turn (order reversed every round), median of the paired step-time ratios.

    python tools/bench_load.py                      # writes bench/results/load.json
    python tools/bench_load.py --text 7b --steps 16 --out bench/results/load-7b.json   # the 7B shape, 7 GB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

CHILD = r"""
import json, resource, sys, time
import numpy as np
import pyvtrim
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
path, use_mmap, threads = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
t0 = time.perf_counter()
m = pyvtrim.Model(path, n_ctx=1024, n_threads=threads, use_mmap=use_mmap)
load_s = time.perf_counter() - t0
after = {"rss_anon_mib": status("RssAnon") / 1024, "rss_file_mib": status("RssFile") / 1024}
ids = m.tokenize("USER: Tell me a story about a lighthouse. ASSISTANT:")
logits = m.forward(ids)
for _ in range(16):
    logits = m.decode(int(np.argmax(logits)))
print(json.dumps(dict(load_s=load_s, **after,
                      peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def model_file(text: str) -> Path:
    from bench import model_path

    import pyvtrim

    if text != "tinyllama":
        return model_path(text, "q8_0")   # written as q8_0 directly: a 7B f16 detour would take 13.5 GB more
    f16 = model_path("tinyllama", "f16")
    q8 = f16.with_name(f16.name.replace("-f16.gguf", "-q8_0.gguf"))
    if not q8.is_file():
        t0 = time.time()
        r = pyvtrim.quantize(f16, q8, "q8_0")
        print(f"quantized {q8.name} in {time.time() - t0:.0f} s: {r}", file=sys.stderr)
    return q8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", default="tinyllama", choices=("tinyllama", "7b"), help="the Llama's shape")
    ap.add_argument("--loads", type=int, default=3, help="loads of each kind")
    ap.add_argument("--steps", type=int, default=32, help="paired decode rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "load.json"))
    args = ap.parse_args()

    import numpy as np

    import pyvtrim

    path = model_file(args.text)
    loads = {"mmap": [], "heap": []}
    for _ in range(args.loads):
        for name, flag in (("mmap", "1"), ("heap", "0")):
            run = subprocess.run([sys.executable, "-c", CHILD, str(path), flag, str(args.threads)],
                                 capture_output=True, text=True, timeout=1800)
            if run.returncode != 0:
                raise SystemExit(run.stderr[-3000:])
            loads[name].append(json.loads(run.stdout.strip().splitlines()[-1]))

    models = {name: pyvtrim.Model(str(path), n_ctx=1024, n_threads=args.threads, use_mmap=(name == "mmap"))
              for name in ("mmap", "heap")}
    ids = models["mmap"].tokenize("USER: Tell me a story about a lighthouse. ASSISTANT:")
    last = {name: int(np.argmax(m.forward(ids))) for name, m in models.items()}
    steps = {name: [] for name in models}
    order = list(models)
    for r in range(args.steps):
        for name in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            logits = models[name].decode(last[name])
            steps[name].append(time.perf_counter() - t0)
            last[name] = int(np.argmax(logits))
    for m in models.values():
        m.close()

    def median(name, key):
        return round(statistics.median(x[key] for x in loads[name]), 3)

    result = {
        "model": path.name, "file_mib": round(path.stat().st_size / 2**20, 1), "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
        "loads": loads,
        "summary": {name: {"load_s_median": median(name, "load_s"), "rss_anon_mib_median": median(name, "rss_anon_mib"),
                           "rss_file_mib_median": median(name, "rss_file_mib"),
                           "peak_rss_mib_median": median(name, "peak_rss_mib"),
                           "decode_tok_s_median": round(1.0 / statistics.median(steps[name]), 2)}
                    for name in loads},
        "decode_heap_over_mmap_step_ratio": round(statistics.median(
            [h / m for h, m in zip(steps["heap"], steps["mmap"])]), 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1), result["decode_heap_over_mmap_step_ratio"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
