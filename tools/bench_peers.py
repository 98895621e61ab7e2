#!/usr/bin/env python3
"""pyvtrim next to its peers, llama.cpp and transformers, on random-weight LLaVA-1.5 models of real shapes.

Speed does not depend on weight values, so the models are written with random weights (nothing is downloaded):
CLIP ViT-L/336 (24 layers, 1024 wide, 576 image tokens) with a TinyLlama-1.1B-shaped or a 7B-shaped Llama and
the real Llama-2 vocabulary, in llama.cpp's own two-file layout (text GGUF + mmproj GGUF), which llama.cpp and
pyvtrim both load, plus a transformers directory (safetensors) holding the same weights.

The peers are installed the way their users install them, once, in an environment outside the repository
($VTRIM_CACHE_DIR/peers, default ~/.cache/pyvtrim/peers): `pip install llama-cpp-python==0.3.36` (which builds
llama.cpp with its multimodal library from source; CMAKE_ARGS=-DGGML_NATIVE=ON) driven through its LLaVA-1.5
chat handler, and torch + transformers for the CPU. pyvtrim runs from the environment this script runs in.

Every configuration runs in its own process (peak RSS is its own), one after the other in one run, with the
same image (a synthetic 640x480 PNG), the same prompt (llama-cpp-python's LLaVA-1.5 template, which all three
use) and the same number of threads. Configurations run in interleaved rounds and the best round counts, so a
burst of other work on the machine does not land on one peer only; each run records its CPU share (CPU time /
(wall time x threads)), which says whether it had its cores. Measured: image encode, prefill, time to first
token, decode tokens/s, peak RSS. Writes JSON, a PNG plot and a Markdown table.

    python tools/bench_peers.py --setup                  # build the peer environment only (minutes)
    python tools/bench_peers.py --quick                  # TinyLlama shape f16, 8 decode tokens, one round
    python tools/bench_peers.py                          # TinyLlama shape, f16 and q8_0, two rounds
    python tools/bench_peers.py --models 7b:q8_0 --peers llama.cpp,pyvtrim,fastv --decode 8 --rounds 1 \
        --out bench/results/peers-7b.json
    python tools/bench_peers.py --nice -10 ...           # on a machine shared with other work (needs root)

What each number means:
  encode   the vision tower + projector (llama.cpp: its own "image slice encoded" timing; pyvtrim: t_encode_ms;
           transformers: get_image_features timed on its own)
  prefill  the decoder over the prompt (llama.cpp: llama_perf t_p_eval, the image embeddings and the text;
           pyvtrim: t_prefill_ms; transformers: TTFT - encode)
  TTFT     wall clock from the request (image file and prompt text) to the first sampled token
  decode   tokens/s of single-token steps: for llama.cpp and pyvtrim the faster of the library's own timing
           (llama_perf n_eval / t_eval; vtrim_stats n_decoded / t_decode_ms) and the wall clock of the loop
           with Python and sampling; transformers: wall clock of forward + argmax
Note: llama.cpp's LLaVA-1.5 vision path runs one CLIP layer fewer than HF's model (22 of the 23 that the
mmproj stores, without clip.vision.feature_layer), so its encode time is slightly flattered; transformers
runs all 24 layers and takes hidden_states[-2].
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_common import TEXT_SHAPES, machine_limits, vision_flops
from peers_env import (CLIP_L_336, IMAGE_TOKEN, PROMPT, QUESTION, bench_config, bench_image, cache_dir, ensure_peers,
                       hf_dir, llamacpp_pair, log, peers_dir)

FASTV = "fastv:2:0.5"
TARGETS = {"ttft_ratio_unreduced": 1.0, "decode_ratio_unreduced": 1.0, "ttft_ratio_fastv": 0.70}


def _raise_priority(nice: int) -> None:
    """In the child before exec: its own session (so its own autogroup, where the kernel groups processes
    by session and shares the CPU between groups first), with that group's and its own nice value."""
    os.setsid()
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass
    os.nice(nice)


def run_child(python: Path, spec: dict, tag: str, nice: int = 0) -> dict:
    logs = cache_dir() / "bench" / "peers" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, result=str(logs / f"{tag}.json"))
    Path(spec["result"]).unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONUNBUFFERED="1")
    if spec["peer"] != "pyvtrim":   # the peer environment must not pick up this environment's packages
        env.pop("PYTHONPATH", None)
    t0 = time.time()
    with open(logs / f"{tag}.log", "w") as out:
        rc = subprocess.run([str(python), str(Path(__file__).resolve().with_name("peers_child.py")),
                             json.dumps(spec)],
                            stdout=out, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=(lambda: _raise_priority(nice)) if nice else None).returncode
    if rc != 0 or not Path(spec["result"]).is_file():
        tail = (logs / f"{tag}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{tag} failed (exit {rc}):\n{tail}")
    r = json.loads(Path(spec["result"]).read_text())
    r["wall_s"] = time.time() - t0
    r["loadavg_1min_after"] = os.getloadavg()[0]
    return r


def cpu_idle(seconds: float = 2.0) -> float:
    """The machine's idle CPU fraction over a short window (Linux /proc/stat; 1.0 elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)   # idle + iowait, total
    try:
        i0, t0 = sample()
        time.sleep(seconds)
        i1, t1 = sample()
        return (i1 - i0) / max(1, t1 - t0)
    except (OSError, ValueError, IndexError):
        return 1.0


def wait_quiet(timeout: float, threshold: float = 0.85) -> float:
    """Waits (at most timeout seconds) until the machine is mostly idle, so a run does not start in the middle
    of someone else's work; returns the idle fraction seen last."""
    deadline = time.time() + timeout
    idle = cpu_idle()
    while idle < threshold and time.time() < deadline:
        idle = cpu_idle(5.0)
    return idle


def merge(runs: list) -> dict:
    """One configuration over several rounds: the prefill figures of its fastest first token, the decode
    figures of its fastest decode, the highest peak RSS."""
    ttft = min(runs, key=lambda r: r["ttft_ms"])
    dec = max(runs, key=lambda r: r["decode_tok_s"])
    out = dict(ttft)
    for k, v in dec.items():
        if k.startswith("decode") or k in ("n_decoded", "kv_cache_bytes_after_decode"):
            out[k] = v
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    out["rounds"] = [{k: r[k] for k in ("ttft_ms", "encode_ms", "prefill_ms", "decode_tok_s", "ttft_cpu_share",
                                        "decode_cpu_share", "idle_before") if k in r} for r in runs]
    return out


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def label(peer: str, reduce: str = "none") -> str:
    if peer != "pyvtrim" or reduce == "none":
        return peer
    _, k, r = reduce.split(":")
    return f"pyvtrim FastV(k={k}, ratio={r})"


def hf_dtype(text: str, choice: str) -> str:
    if choice != "auto":
        return choice
    from pyvtrim.demo import demo_tensors
    import numpy as np

    _, shapes = demo_tensors(bench_config(text))
    n = sum(int(np.prod(s)) for s in shapes.values())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "float32" if 4 * n < 0.6 * ram else "bfloat16"


def ratios(rows: list) -> dict:
    base = next((r for r in rows if r["peer"] == "llama.cpp"), None)
    out = {}
    if base is None:
        return out
    for r in rows:
        r["ttft_ratio"] = r["ttft_ms"] / base["ttft_ms"]
        r["decode_ratio"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["encode_ratio"] = r["encode_ms"] / base["encode_ms"] if base["encode_ms"] == base["encode_ms"] else None
        r["prefill_ratio"] = r["prefill_ms"] / base["prefill_ms"]
    plain = next((r for r in rows if r["label"] == "pyvtrim"), None)
    fastv = next((r for r in rows if r["label"] == label("pyvtrim", FASTV)), None)
    if plain:
        out["ttft_ratio_unreduced"] = dict(value=plain["ttft_ratio"], target=f"<= {TARGETS['ttft_ratio_unreduced']}",
                                           met=plain["ttft_ratio"] <= TARGETS["ttft_ratio_unreduced"])
        out["decode_ratio_unreduced"] = dict(value=plain["decode_ratio"],
                                             target=f">= {TARGETS['decode_ratio_unreduced']}",
                                             met=plain["decode_ratio"] >= TARGETS["decode_ratio_unreduced"])
    if fastv:
        out["ttft_ratio_fastv"] = dict(value=fastv["ttft_ratio"], target=f"<= {TARGETS['ttft_ratio_fastv']}",
                                       met=fastv["ttft_ratio"] <= TARGETS["ttft_ratio_fastv"])
    return out


def limit_shares(rows: list, limits: dict) -> None:
    """Adds "share of limit" figures to each row: encode + prefill FLOP/s over the machine's f16 product rate,
    decode bytes/s (text weights + the KV cache read per step, x tok/s) over its copy bandwidth. The FLOPs and
    bytes are pyvtrim's count for the unreduced prompt on these files (its stats and memory report); the
    llama.cpp row, on the same files and prompt, is measured against the same count."""
    base = next((r for r in rows if r["peer"] == "pyvtrim" and "prefill_flops" in r
                 and r.get("n_image_tokens_kept") == r.get("n_image_tokens")), None)
    if base is None or not limits:
        return
    flops = vision_flops(CLIP_L_336, base["n_image_tokens"], base["n_embd"]) + base["prefill_flops"]
    step_bytes = base["weights_text_bytes"] + base["kv_cache_bytes"]
    for r in rows:
        if r["peer"] not in ("pyvtrim", "llama.cpp") or r["label"] != r["peer"]:
            continue
        r["prefill_gflops_per_s"] = flops / (r["encode_ms"] + r["prefill_ms"]) / 1e6
        r["share_of_f16_matmul_rate"] = r["prefill_gflops_per_s"] / limits["f16_gflops"]
        r["decode_gb_per_s"] = step_bytes * r["decode_tok_s"] / 1e9
        r["share_of_copy_bandwidth"] = r["decode_gb_per_s"] / limits["copy_gb_per_s"]


def table(report: dict) -> str:
    lines = []
    for model in report["models"]:
        lines.append(f"\n**{model['name']}** ({model['threads']} threads; ratios against llama.cpp)\n")
        lines.append("| peer | image tokens | encode ms | prefill ms | TTFT ms (ratio) | decode tok/s (ratio) | "
                     "peak RSS MiB | CPU share | prefill GFLOP/s (share) | decode GB/s (share) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in model["runs"]:
            kept = f"{r['n_image_tokens_kept']}/{r['n_image_tokens']}" if "n_image_tokens_kept" in r else "576"
            name = r["label"] + (" (one run per shape)" if r.get("shared_from") else "")
            lines.append(f"| {name} | {kept} | {r['encode_ms']:.0f} | {r['prefill_ms']:.0f} | "
                         f"{r['ttft_ms']:.0f} ({r.get('ttft_ratio', float('nan')):.2f}) | "
                         f"{r['decode_tok_s']:.2f} ({r.get('decode_ratio', float('nan')):.2f}) | "
                         f"{r['peak_rss_mib']:.0f} | {r['ttft_cpu_share']:.2f} / {r['decode_cpu_share']:.2f} | "
                         + (f"{r['prefill_gflops_per_s']:.1f} ({r['share_of_f16_matmul_rate']:.2f}) | "
                            f"{r['decode_gb_per_s']:.2f} ({r['share_of_copy_bandwidth']:.2f}) |"
                            if "share_of_copy_bandwidth" in r else "- | - |"))
        lines.append("\nCPU share: CPU time of the process / (wall time x threads) while it made its first token / "
                     "decoded; near 1.0 means it had its cores to itself.")
        if report.get("machine_limits"):
            lim = report["machine_limits"]
            lines.append(f"Share of limit: encode + prefill FLOP/s over ggml's f16 product rate "
                         f"({lim['f16_gflops']} GFLOP/s), decode bytes/s over the copy bandwidth "
                         f"({lim['copy_gb_per_s']} GB/s), both measured at the start with {lim['threads']} threads.")
        for name, t in model["targets"].items():
            lines.append(f"\n- {name}: {t['value']:.2f} (target {t['target']}): {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def plot(report_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(report_path.read_text())
    models = report["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.2 * len(models) + 0.6), squeeze=False)
    colors = {"encode": "#4C72B0", "prefill": "#DD8452", "other": "#BBBBBB"}
    for row, model in zip(axes, models):
        runs = model["runs"]
        names = [r["label"].replace("pyvtrim FastV", "pyvtrim\nFastV") for r in runs]
        y = range(len(runs))
        enc = [r["encode_ms"] / 1000 if r["encode_ms"] == r["encode_ms"] else 0 for r in runs]
        pre = [max(0.0, r["prefill_ms"] / 1000) for r in runs]
        other = [max(0.0, r["ttft_ms"] / 1000 - e - p) for r, e, p in zip(runs, enc, pre)]
        ax = row[0]
        ax.barh(y, enc, color=colors["encode"], label="image encode")
        ax.barh(y, pre, left=enc, color=colors["prefill"], label="prefill")
        ax.barh(y, other, left=[e + p for e, p in zip(enc, pre)], color=colors["other"], label="other")
        for i, r in enumerate(runs):
            ax.text(r["ttft_ms"] / 1000, i, f" {r['ttft_ms'] / 1000:.1f} s ({r.get('ttft_ratio', 0):.2f}x)",
                    va="center", fontsize=8)
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("time to first token, s (lower is better)")
        ax.set_title(model["name"], fontsize=9)
        ax.set_xlim(0, max(r["ttft_ms"] for r in runs) / 1000 * 1.8)
        ax.legend(fontsize=7, loc="center right")
        ax = row[1]
        ax.barh(y, [r["decode_tok_s"] for r in runs], color="#55A868")
        for i, r in enumerate(runs):
            ax.text(r["decode_tok_s"], i, f" {r['decode_tok_s']:.2f} ({r.get('decode_ratio', 0):.2f}x)",
                    va="center", fontsize=8)
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s (higher is better)")
        ax.set_xlim(0, max(r["decode_tok_s"] for r in runs) * 1.35)
    fig.suptitle(f"LLaVA-1.5 shapes, random weights, CPU, {models[0]['threads']} threads "
                 f"({report['machine']['cpu']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tinyllama:f16,tinyllama:q8_0",
                    help="text shape:outtype pairs (shapes: %s; outtypes f16, q8_0, and q4_K_M, q4_0, q5_K_M, "
                    "q6_K made by pyvtrim.quantize from the f16 file)" % ", ".join(TEXT_SHAPES))
    ap.add_argument("--peers", default="llama.cpp,pyvtrim,fastv,transformers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llamacpp-no-repack", action="store_true", help="llama.cpp without its weight repacking "
                    "(extra buffer types; pyvtrim does not repack either). Its AMX/repack path crashed on 4-bit "
                    "files on a Sapphire Rapids VM")
    ap.add_argument("--decode", type=int, default=32, help="decode tokens per configuration")
    ap.add_argument("--reps", type=int, default=1, help="prefills per configuration and round")
    ap.add_argument("--rounds", type=int, default=2, help="runs of every configuration, interleaved (the fastest "
                    "counts)")
    ap.add_argument("--quiet-timeout", type=float, default=600, help="before each run, wait up to this many "
                    "seconds for the machine to be 85%% idle (0: do not wait)")
    ap.add_argument("--nice", type=int, default=0, help="scheduling priority change for the measured processes "
                    "(e.g. -10 on a shared machine: every peer gets the same priority; negative needs root)")
    ap.add_argument("--hf-dtype", default="auto", help="transformers dtype: auto (float32 where it fits in half "
                    "the memory, else bfloat16), float32, bfloat16")
    ap.add_argument("--quick", action="store_true", help="TinyLlama shape f16 only, 8 decode tokens, one prefill")
    ap.add_argument("--setup", action="store_true", help="build the peer environment and exit")
    ap.add_argument("--out", default="bench/results/peers.json")
    ap.add_argument("--table", metavar="JSON", help="print the Markdown table of an earlier run's JSON and exit")
    ap.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help=argparse.SUPPRESS)   # internal
    args = ap.parse_args(argv)

    if args.plot:
        plot(Path(args.plot[0]), Path(args.plot[1]))
        return 0
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    py = ensure_peers()
    if args.setup:
        return 0
    if args.quick:
        args.models, args.decode, args.reps, args.rounds = "tinyllama:f16", 8, 1, 1
    import pyvtrim

    peers = args.peers.split(",")
    image = bench_image()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(machine=dict(cpu=cpu_name(), cpu_count=os.cpu_count(), platform=platform.platform()),
                  versions=dict(json.loads((peers_dir() / "ready.json").read_text()), pyvtrim=pyvtrim.version()),
                  prompt=PROMPT, question=QUESTION, image="synthetic 640x480 PNG", decode_tokens=args.decode,
                  reps=args.reps, rounds=args.rounds, nice=args.nice, quick=args.quick,
                  llamacpp_repack=not args.llamacpp_no_repack, models=[])
    from pyvtrim import _ffi

    report["pyvtrim_library"] = str(_ffi.find_library())
    report["machine_limits"] = machine_limits(args.threads)
    log(f"machine: {report['machine_limits']}")
    plans = []   # (model entry, [(python, spec, label)])
    hf_done = set()
    for item in args.models.split(","):
        text, outtype = item.split(":")
        text_path, mmproj = llamacpp_pair(text, outtype)
        base = dict(text=str(text_path), mmproj=str(mmproj), image=str(image), prompt=PROMPT,
                    threads=args.threads, decode=args.decode, reps=args.reps)
        model = dict(name=f"CLIP ViT-L/336 + {text}-shaped Llama, {outtype}", text_shape=text, outtype=outtype,
                     threads=args.threads, files=[text_path.name, mmproj.name], runs=[], targets={})
        report["models"].append(model)
        plan = []
        if "llama.cpp" in peers:
            plan.append((py, dict(base, peer="llama.cpp", no_extra_bufts=args.llamacpp_no_repack), "llama.cpp"))
        if "pyvtrim" in peers:
            plan.append((Path(sys.executable), dict(base, peer="pyvtrim", reduce="none"), "pyvtrim"))
        if "fastv" in peers:
            plan.append((Path(sys.executable), dict(base, peer="pyvtrim", reduce=FASTV), label("pyvtrim", FASTV)))
        if "transformers" in peers and text not in hf_done:   # one run per shape (it does not read GGUF)
            with pyvtrim.Model(str(text_path), vocab_only=True) as vm:
                ids = vm.tokenize(PROMPT)
            n_img = (CLIP_L_336["image_size"] // CLIP_L_336["patch_size"]) ** 2
            expanded = [t for i in ids for t in ([i] * n_img if i == IMAGE_TOKEN else [i])]
            dtype = hf_dtype(text, args.hf_dtype)
            spec = dict(base, peer="transformers", hf_dir=str(hf_dir(text)), ids=expanded, dtype=dtype)
            plan.append((py, spec, f"transformers ({dtype}, safetensors)"))
            hf_done.add(text)
        plans.append((model, plan))

    def shared_rows(model):
        """transformers runs once per shape (it reads safetensors, not GGUF): its row joins every outtype."""
        for other, plan in plans:
            if other is not model and other["text_shape"] == model["text_shape"]:
                for x in other["runs"]:
                    if x["peer"] == "transformers" and not any(y["peer"] == "transformers" for y in model["runs"]):
                        model["runs"].append(dict(x, shared_from=other["name"]))

    # Rounds: every configuration once per round, so a burst of other work on the machine hits one run of a
    # configuration, not all of them; the best of the rounds counts.
    raw = {}
    for rnd in range(args.rounds):
        for model, plan in plans:
            for python, spec, name in plan:
                tag = f"{model['text_shape']}-{model['outtype']}-{re.sub(r'[^A-Za-z0-9.=-]+', '', name)}-r{rnd}"
                idle = wait_quiet(args.quiet_timeout) if args.quiet_timeout > 0 else None
                log(f"[round {rnd + 1}/{args.rounds}] [{model['name']}] {name} ..." +
                    (f" (machine {idle:.0%} idle)" if idle is not None else ""))
                r = run_child(python, spec, tag, args.nice)
                r["idle_before"] = idle
                r.update(peer=spec["peer"], label=name)
                raw.setdefault((model["name"], name), []).append(r)
                log(f"  TTFT {r['ttft_ms']:.0f} ms (encode {r['encode_ms']:.0f}, prefill {r['prefill_ms']:.0f}), "
                    f"decode {r['decode_tok_s']:.2f} tok/s, peak RSS {r['peak_rss_mib']:.0f} MiB, CPU share "
                    f"{r['ttft_cpu_share']:.2f}/{r['decode_cpu_share']:.2f}")
                for m2, plan2 in plans:
                    m2["runs"] = [dict(merge(raw[(m2["name"], n)]), peer=sp["peer"], label=n)
                                  for _, sp, n in plan2 if (m2["name"], n) in raw]
                for m2, _ in plans:
                    shared_rows(m2)
                    m2["targets"] = ratios(m2["runs"])
                    limit_shares(m2["runs"], report.get("machine_limits"))
                model["first_tokens"] = {x["label"]: x.get("first_token") for x in model["runs"]
                                         if x.get("first_token") is not None}
                out.write_text(json.dumps(report, indent=2))
    out.write_text(json.dumps(report, indent=2))
    png = out.with_suffix(".png")
    rc = subprocess.run([str(py), os.path.abspath(__file__), "--plot", str(out), str(png)]).returncode
    print(table(report))
    print(f"\nwrote {out}" + (f" and {png}" if rc == 0 else " (the plot failed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
