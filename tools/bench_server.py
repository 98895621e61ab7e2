#!/usr/bin/env python3
"""Benchmark the reuse across turns and pyvtrim serve's --parallel, on the LLaVA-1.5 TinyLlama shape.

1. Second turn vs first (in-process, one Session, create_chat_completion): time to first token of a turn with
   the image and a question, then of a short follow-up question in the same conversation (the prefix with the
   image is reused: no encode, only the new tokens prefilled). Target: second-turn TTFT <= 0.1x the first.
2. Throughput under load: `pyvtrim serve --parallel 1` and `--parallel 2` (each its own process, the cores
   shared out among the sessions), `--requests` text requests from as many concurrent clients, greedy, at
   most `--tokens` tokens each (a random-weight reply may end early, so the tokens generated are summed);
   tokens/s = completion tokens summed / wall time.

    python tools/bench_server.py                       # writes bench/results/server.json
    python tools/bench_server.py --quick               # fewer requests and tokens
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import bench_image, model_path  # noqa: E402


def data_url(arr) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def turns(path: str, threads: int, reps: int) -> dict:
    import pyvtrim

    url = data_url(bench_image())
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": "Describe this picture in detail."}]}]
    rows = []
    with pyvtrim.Model(path, n_ctx=2048, n_threads=threads) as m:
        for _ in range(reps):
            s = m.session()
            r1 = s.create_chat_completion(first, max_tokens=8)
            conv = first + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                            {"role": "user", "content": "And the colours?"}]
            r2 = s.create_chat_completion(conv, max_tokens=8)
            u1, u2 = r1["usage"], r2["usage"]
            rows.append({"first_ttft_ms": u1["pyvtrim"]["ttft_ms"], "second_ttft_ms": u2["pyvtrim"]["ttft_ms"],
                         "first_prompt_tokens": u1["prompt_tokens"], "second_prompt_tokens": u2["prompt_tokens"],
                         "second_cached_tokens": u2["prompt_tokens_details"]["cached_tokens"],
                         "second_prefilled_tokens": u2["pyvtrim"]["prefilled_tokens"],
                         "second_encode_ms": u2["pyvtrim"]["t_encode_ms"]})
            s.close()
    best = min(rows, key=lambda r: r["second_ttft_ms"] / r["first_ttft_ms"])
    best["ratio"] = best["second_ttft_ms"] / best["first_ttft_ms"]
    return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path: str, parallel: int, threads: int, n_requests: int, n_tokens: int) -> dict:
    port = free_port()
    per = max(1, threads // parallel)
    proc = subprocess.Popen([sys.executable, "-m", "pyvtrim", "serve", path, "--port", str(port), "--parallel",
                             str(parallel), "--threads", str(per), "--n-ctx", "1024", "--queue", str(n_requests),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)

        def one(i: int) -> dict:
            body = json.dumps({"messages": [{"role": "user", "content": f"Tell me a story number {i}."}],
                               "max_tokens": n_tokens, "temperature": 0}).encode()
            req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=3600) as r:
                return json.loads(r.read())

        one(-1)  # warm-up
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n_requests) as ex:
            results = list(ex.map(one, range(n_requests)))
        wall = time.perf_counter() - t0
        tokens = sum(r["usage"]["completion_tokens"] for r in results)
        return {"parallel": parallel, "threads_per_session": per, "requests": n_requests, "tokens": tokens,
                "wall_s": wall, "tokens_per_s": tokens / wall}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a LLaVA GGUF (default: the TinyLlama-shaped f16 one tools/bench.py writes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench/results/server.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.tokens, args.reps = 2, 8, 1
    path = args.model or str(model_path("tinyllama", "f16"))
    out = {"model": os.path.basename(path), "machine": platform.machine(), "cpus": os.cpu_count(),
           "threads": args.threads, "turns": turns(path, args.threads, args.reps),
           "load": [load(path, p, args.threads, args.requests, args.tokens) for p in (1, 2)]}
    a, b = out["load"]
    out["parallel2_vs_1"] = b["tokens_per_s"] / a["tokens_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    t = out["turns"]
    print(f"TTFT first turn {t['first_ttft_ms']:.0f} ms, second {t['second_ttft_ms']:.0f} ms "
          f"({t['ratio']:.3f}x; {t['second_cached_tokens']} of {t['second_prompt_tokens']} prompt tokens reused)")
    for r in out["load"]:
        print(f"--parallel {r['parallel']}: {r['tokens']} tokens in {r['wall_s']:.1f} s = {r['tokens_per_s']:.2f} tok/s")
    print(f"--parallel 2 vs 1: {out['parallel2_vs_1']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
