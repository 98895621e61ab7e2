#!/usr/bin/env python3
"""What ggml's RPC backend costs: the decoder split over 1 and 2 rpc-server processes against the local run.

The model is bench_vlcache.py's "512-mha" LLaVA (16 layers, 512 wide, q8_0, random weights; 576 image
tokens). The servers are vtrim-rpc-server on loopback ports of this machine, so the figures give the RPC
protocol's own cost per step (serialising the graph, one round trip per server and split, the hidden state
sent and read back) without a network's latency; on real hosts add the round-trip time once per server per
step. All three configurations stay loaded and decode side by side, one step each in turn (the order
reversed every round), so drift lands on all alike; the overhead is the median of the paired differences.

    python tools/bench_rpc.py                 # writes bench/results/rpc.json
    python tools/bench_rpc.py --steps 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests" / "support"))

from bench_vlcache import PROMPT, model_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=48, help="decode rounds")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="threads of the local process and of each server")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "rpc.json"))
    args = ap.parse_args()

    import numpy as np

    import pyvtrim
    from rpc_servers import start_rpc_server

    path = model_path("512-mha", "q8_0")
    started = [start_rpc_server(threads=args.threads) for _ in range(2)]
    endpoints = [e for _, e in started]
    configs = {"local": None, "rpc-1": endpoints[:1], "rpc-2": endpoints}
    image = np.random.default_rng(0).integers(0, 256, size=(336, 336, 3), dtype=np.uint8)
    models, result = {}, {"configs": {}}
    try:
        for name, rpc in configs.items():
            m = pyvtrim.Model(str(path), n_ctx=2048, n_threads=args.threads, rpc=rpc)
            ids = m.tokenize(m.chat_prompt(PROMPT, 1))
            t0 = time.perf_counter()
            logits = m.forward(ids, [image])
            ttft = (time.perf_counter() - t0) * 1000.0
            models[name] = (m, int(np.argmax(logits)))
            result["configs"][name] = {"rpc": rpc or [], "ttft_ms": round(ttft, 1),
                                       "n_bytes_rpc": m.info["n_bytes_rpc"], "n_bytes": m.info["n_bytes"]}
        steps = {name: [] for name in configs}
        order = list(configs)
        for r in range(args.steps):
            for name in (order if r % 2 == 0 else order[::-1]):
                m, tok = models[name]
                t0 = time.perf_counter()
                logits = m.decode(tok)
                steps[name].append((time.perf_counter() - t0) * 1000.0)
                models[name] = (m, int(np.argmax(logits)))
        same = len({models[n][1] for n in configs}) == 1
        for name in configs:
            c = result["configs"][name]
            c["decode_step_ms_median"] = round(statistics.median(steps[name]), 3)
            if name != "local":
                diffs = [a - b for a, b in zip(steps[name], steps["local"])]
                c["overhead_per_step_ms_median"] = round(statistics.median(diffs), 3)
                c["step_ratio_vs_local"] = round(statistics.median(
                    [a / b for a, b in zip(steps[name], steps["local"])]), 3)
        result.update(
            model=path.name, threads=args.threads, rounds=args.steps, same_tokens_in_all=same,
            machine=f"{platform.machine()}, {os.cpu_count()} cores, servers on loopback of the same machine",
            date=time.strftime("%Y-%m-%d"))
    finally:
        for m, _ in models.values():
            m.close()
        for proc, _ in started:
            proc.terminate()
            proc.wait(timeout=10)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
