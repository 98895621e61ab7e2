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
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_common import CLIP_L_336 as _CLIP_L_336, TEXT_SHAPES

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PEER_PACKAGES = ["torch==2.13.0", "transformers==5.23.0", "numpy", "pillow", "safetensors", "matplotlib"]

CLIP_L_336 = dict(_CLIP_L_336, projection_dim=768)   # the transformers config wants the projection width
IMAGE_TOKEN = 32000

QUESTION = "Describe this picture in detail, then list every object you can see."
# llama-cpp-python's Llava15ChatHandler: its system message and template, rendered for one image and one question.
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
PROMPT = f"{SYSTEM}\nUSER: <image>{QUESTION}\nASSISTANT: "

FASTV = "fastv:2:0.5"
TARGETS = {"ttft_ratio_unreduced": 1.0, "decode_ratio_unreduced": 1.0, "ttft_ratio_fastv": 0.70}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("VTRIM_CACHE_DIR") or Path.home() / ".cache" / "pyvtrim")


def peers_dir() -> Path:
    return cache_dir() / "peers"


# ------------------------------------------------------------------------------------------------
# The peer environment
# ------------------------------------------------------------------------------------------------


def peer_python() -> Path:
    return peers_dir() / "venv" / "bin" / "python"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip(args, env=None) -> None:
    cmd = [str(peer_python()), "-m", "pip", "install", *args]
    log("$ " + " ".join(cmd))
    logf = peers_dir() / "install.log"
    with open(logf, "a") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"pip failed (exit {rc}); see {logf}")


def ensure_peers(force: bool = False) -> Path:
    """Creates the peer environment once (llama-cpp-python built from source, torch, transformers)."""
    marker = peers_dir() / "ready.json"
    py = peer_python()
    if marker.is_file() and py.is_file() and not force:
        return py
    peers_dir().mkdir(parents=True, exist_ok=True)
    if not py.is_file():
        base = getattr(sys, "_base_executable", None) or sys.executable
        log(f"creating {py.parent.parent} ...")
        subprocess.run([base, "-m", "venv", str(py.parent.parent)], check=True)
    t0 = time.time()
    have = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('llama_cpp_python'))"],
                          capture_output=True, text=True).stdout.strip()
    if have != LLAMA_CPP_PYTHON.split("==")[1]:
        # llama-cpp-python as its users install it: from the sdist, compiled here. The sdist the pyvtrim build
        # already fetched (same pin, checked by hash) saves the download.
        sdist = cache_dir() / "llama_cpp_python-0.3.36.tar.gz"
        spec = str(sdist) if sdist.is_file() and _sha256(sdist) == LLAMA_CPP_PYTHON_SHA256 else LLAMA_CPP_PYTHON
        env = dict(os.environ)
        env["CMAKE_ARGS"] = (env.get("CMAKE_ARGS", "") + " -DGGML_NATIVE=ON").strip()
        log("building llama-cpp-python (llama.cpp + its multimodal library) from source: minutes on 2 cores")
        _pip([spec], env=env)
    _pip(PEER_PACKAGES)
    versions = subprocess.run([str(py), "-c", "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) "
                               "for p in ['llama_cpp_python', 'torch', 'transformers', 'numpy']}))"],
                              check=True, capture_output=True, text=True).stdout.strip()
    marker.write_text(versions)
    log(f"peer environment ready in {time.time() - t0:.0f} s: {versions}")
    return py


# ------------------------------------------------------------------------------------------------
# Models, image, prompt
# ------------------------------------------------------------------------------------------------


def bench_config(text: str) -> dict:
    from pyvtrim.demo import DEMO_CONFIG

    cfg = json.loads(json.dumps(DEMO_CONFIG))
    cfg["text_config"].update(TEXT_SHAPES[text])
    cfg["vision_config"].update(CLIP_L_336)
    return cfg


def preprocessor() -> dict:
    """llava-hf's CLIPImageProcessor at 336 px: resize the shortest edge, center crop, CLIP mean/std."""
    side = CLIP_L_336["image_size"]
    return dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": side},
                resample=3, do_center_crop=True, crop_size={"height": side, "width": side}, do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
                image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def model_dir(text: str) -> Path:
    return cache_dir() / "bench" / "peers" / text


def llamacpp_pair(text: str, outtype: str) -> tuple:
    """llama.cpp's two-file layout (text + mmproj), written by pyvtrim's converter from random weights."""
    from pyvtrim.conversion.llamacpp_layout import mmproj_path
    from pyvtrim.conversion.llava import image_params, parse_llava_config, write_llava
    from pyvtrim.conversion.tensors import ArraySource
    from pyvtrim.demo import demo_tensors, demo_vocab

    out = model_dir(text) / f"llava-clipL336-{text}-{outtype}.gguf"
    proj = mmproj_path(out)
    if not (out.is_file() and proj.is_file()):
        cfg = bench_config(text)
        t0 = time.time()
        log(f"writing {out} + {proj.name} (random weights) ...")
        hp = parse_llava_config(cfg, "bench config", name=f"llava-1.5 {text} shape (random weights)")
        image = image_params(preprocessor(), hp.vision, "bench preprocessor")
        tensors, shapes = demo_tensors(cfg)
        vocab = demo_vocab(cfg["text_config"]["vocab_size"])
        write_llava(out, hp, ArraySource(tensors, shapes), vocab, image, outtype, layout="llama.cpp",
                    where="bench model")
        log(f"  done in {time.time() - t0:.0f} s")
    return out, proj


def hf_dir(text: str) -> Path:
    """A transformers directory with the same random weights (f16 safetensors, shards of <= 2 GB)."""
    import numpy as np
    from safetensors.numpy import save_file

    from pyvtrim.demo import demo_tensors

    d = model_dir(text) / "hf"
    done = d / "model.safetensors.index.json"
    if done.is_file():
        return d
    t0 = time.time()
    log(f"writing {d} (the same random weights, safetensors) ...")
    d.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(text)
    (d / "config.json").write_text(json.dumps(dict(cfg, torch_dtype="float16"), indent=2))
    (d / "preprocessor_config.json").write_text(json.dumps(preprocessor(), indent=2))
    tensors, _ = demo_tensors(cfg)
    weight_map, shard, shard_bytes, n_shard, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(d / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            n_shard += 1
            shard, shard_bytes = {}, 0

    for name, make in tensors.items():
        arr = make().astype(np.float16)
        shard[name] = arr
        shard_bytes += arr.nbytes
        total += arr.nbytes
        if shard_bytes >= 2 << 30:
            flush()
    flush()
    done.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    log(f"  done in {time.time() - t0:.0f} s")
    return d


def bench_image() -> Path:
    """A synthetic 640x480 RGB PNG (gradients and a diagonal pattern)."""
    import numpy as np
    from PIL import Image

    path = cache_dir() / "bench" / "peers" / "image-640x480.png"
    if not path.is_file():
        y, x = np.mgrid[0:480, 0:640]
        img = np.stack([(x * 255 // 639), (y * 255 // 479), ((x + y) % 256)], axis=-1).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    return path


# ------------------------------------------------------------------------------------------------
# One configuration, in a child process
# ------------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Span:
    """Wall time and this process's CPU time (all threads) of a block. cpu_share(threads) near 1 says the
    threads had the cores to themselves; well below 1 says something else was running (a noisy machine)."""

    def __enter__(self) -> "Span":
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c

    def share(self, threads: int) -> float:
        return self.cpu / (self.wall * threads) if self.wall > 0 else float("nan")


def child_pyvtrim(s: dict) -> dict:
    import numpy as np

    import pyvtrim

    reduce = None
    if s["reduce"].startswith("fastv:"):
        _, k, r = s["reduce"].split(":")
        reduce = pyvtrim.FastV(k=int(k), ratio=float(r))
    with Span() as load:
        m = pyvtrim.Model(s["text"], mmproj=s["mmproj"], n_ctx=2048, n_threads=s["threads"])
    ids = m.tokenize(s["prompt"])
    m.forward(m.tokenize("Hello"))                       # warm-up: first graph, buffers
    best: dict = {}
    tok = 0
    for _ in range(s["reps"]):
        with Span() as span:
            logits = m.forward(ids, [s["image"]], reduce=reduce)
            tok = int(np.argmax(logits))
        st = m.last_stats
        if not best or span.wall * 1000.0 < best["ttft_ms"]:
            best = dict(ttft_ms=span.wall * 1000.0, encode_ms=st["t_encode_ms"], prefill_ms=st["t_prefill_ms"],
                        n_prompt_tokens=st["n_prompt_tokens"], n_image_tokens=st["n_image_tokens"],
                        n_image_tokens_kept=st["n_image_tokens_kept"], kv_cache_bytes=st["kv_cache_bytes"],
                        first_token=tok, ttft_cpu_share=span.share(s["threads"]))
    # decode: greedy continuation of the last prefill (end-of-generation ignored, as for the other peers)
    decode = getattr(m, "decode", None)
    if decode is None:   # a Model without a public single-step API
        from pyvtrim.errors import check

        def decode(t, _m=m):
            check(_m._lib.vtrim_decode(_m._ctx(), int(t)))
    get_logits = getattr(m, "logits", None) or m._logits
    with Span() as span:
        for _ in range(s["decode"]):
            decode(tok)
            tok = int(np.argmax(get_logits()))
    st = m.last_stats
    # As for llama.cpp: the faster of the library's own decode timing (t_decode_ms: the vtrim_decode calls,
    # as llama_perf times llama_decode) and the wall clock of the Python loop.
    internal = st["n_decoded"] / (st["t_decode_ms"] / 1000.0) if st["t_decode_ms"] > 0 else 0.0
    wall = s["decode"] / span.wall
    best.update(decode_tok_s=max(internal, wall), decode_tok_s_internal=internal, decode_tok_s_wall=wall,
                decode_cpu_share=span.share(s["threads"]), kv_cache_bytes_after_decode=st["kv_cache_bytes"],
                load_s=load.wall)
    m.close()
    return best


def child_llamacpp(s: dict) -> dict:
    import base64

    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    # llama.cpp and mtmd log to fd 2; the encode timing comes from mtmd's own print_timings lines there.
    err_path = s["result"] + ".stderr"
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)

    with Span() as load:
        handler = Llava15ChatHandler(clip_model_path=s["mmproj"], verbose=True)
        llm = Llama(model_path=s["text"], chat_handler=handler, n_ctx=2048, n_threads=s["threads"],
                    n_threads_batch=s["threads"], verbose=True)
        handler._init_mtmd_context(llm)   # the CLIP model loads here, not inside the first timed request
    llm.eval(llm.tokenize(b"Hello"))   # warm-up: touches the (memory-mapped) text weights
    llama_cpp.llama_synchronize(llm._ctx.ctx)
    llm.reset()
    uri = "data:image/png;base64," + base64.b64encode(Path(s["image"]).read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": QUESTION}]}]
    eos = llm.token_eos()
    best: dict = {}
    for rep in range(s["reps"]):
        last_rep = rep == s["reps"] - 1   # the last request also decodes
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        sys.stderr.flush()
        offset = os.lseek(2, 0, os.SEEK_CUR)
        times = []
        with Span() as span:
            stream = llm.create_chat_completion(messages=messages, max_tokens=s["decode"] + 1 if last_rep else 1,
                                                temperature=0.0, repeat_penalty=1.0, logit_bias={str(eos): -1e4},
                                                stream=True)
            for _ in stream:
                times.append(time.perf_counter())
                if len(times) == 1:
                    first = (times[0] - span.w, time.process_time() - span.c)
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        sys.stderr.flush()
        with open(err_path, "rb") as f:
            f.seek(offset)
            logs = f.read().decode("utf-8", "replace")
        encode = sum(float(x) for x in re.findall(r"image slice encoded in (\d+(?:\.\d+)?) ms", logs))
        image_batches = sum(float(x) for x in re.findall(r"image decoded \(batch \d+/\d+\) in (\d+(?:\.\d+)?) ms",
                                                          logs))
        ttft = first[0] * 1000.0
        if not best or ttft < best["ttft_ms"]:
            # prefill = TTFT - encode, as for transformers: llama_perf's prompt time runs from a decode to the
            # next synchronization, which can hold the image encode and time before the request.
            best.update(ttft_ms=ttft, encode_ms=encode, prefill_ms=ttft - encode, image_prefill_ms=image_batches,
                        llama_perf_prompt_ms=perf.t_p_eval_ms, n_prompt_tokens=perf.n_p_eval,
                        ttft_cpu_share=first[1] / (first[0] * s["threads"]))
        if last_rep:
            internal = perf.n_eval / (perf.t_eval_ms / 1000.0) if perf.t_eval_ms > 0 else 0.0
            # every streamed token after the first needed one decode (n_eval of them)
            wall = perf.n_eval / (times[-1] - times[0]) if times[-1] > times[0] else 0.0
            cpu_decode = (span.cpu - first[1]) / ((span.wall - first[0]) * s["threads"])
            # the faster of llama.cpp's own decode timing and the wall clock of the stream: its best case
            best.update(decode_tok_s=max(internal, wall), decode_tok_s_llama_perf=internal, decode_tok_s_wall=wall,
                        n_decoded=perf.n_eval, decode_cpu_share=cpu_decode)
    best.update(load_s=load.wall)
    return best


def child_transformers(s: dict) -> dict:
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(s["threads"])
    dtype = getattr(torch, s["dtype"])
    with Span() as load:
        model = LlavaForConditionalGeneration.from_pretrained(s["hf_dir"], dtype=dtype)
        model.eval()
        proc = CLIPImageProcessor.from_pretrained(s["hf_dir"])
    ids = torch.tensor([s["ids"]], dtype=torch.long)
    best: dict = {}
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 15043]]))   # warm-up
        for _ in range(s["reps"]):
            with Span() as span:
                pixels = proc(images=Image.open(s["image"]).convert("RGB"), return_tensors="pt")["pixel_values"]
                out = model(input_ids=ids, pixel_values=pixels.to(dtype), use_cache=True, logits_to_keep=1)
                tok = int(out.logits[0, -1].argmax())
            if not best or span.wall * 1000.0 < best["ttft_ms"]:
                best = dict(ttft_ms=span.wall * 1000.0, first_token=tok, n_prompt_tokens=int(ids.shape[1]),
                            ttft_cpu_share=span.share(s["threads"]))
        with Span() as enc:
            model.model.get_image_features(pixel_values=pixels.to(dtype), vision_feature_layer=-2,
                                           vision_feature_select_strategy="default")
        best["encode_ms"] = enc.wall * 1000.0
        best["prefill_ms"] = best["ttft_ms"] - best["encode_ms"]
        past = out.past_key_values
        with Span() as span:
            for _ in range(s["decode"]):
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = int(out.logits[0, -1].argmax())
        best.update(decode_tok_s=s["decode"] / span.wall, decode_cpu_share=span.share(s["threads"]))
    best.update(load_s=load.wall, dtype=s["dtype"])
    return best


CHILDREN = {"pyvtrim": child_pyvtrim, "llama.cpp": child_llamacpp, "transformers": child_transformers}


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
        rc = subprocess.run([str(python), os.path.abspath(__file__), "--child", json.dumps(spec)],
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


def table(report: dict) -> str:
    lines = []
    for model in report["models"]:
        lines.append(f"\n**{model['name']}** ({model['threads']} threads; ratios against llama.cpp)\n")
        lines.append("| peer | image tokens | encode ms | prefill ms | TTFT ms (ratio) | decode tok/s (ratio) | "
                     "peak RSS MiB | CPU share |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in model["runs"]:
            kept = f"{r['n_image_tokens_kept']}/{r['n_image_tokens']}" if "n_image_tokens_kept" in r else "576"
            name = r["label"] + (" (one run per shape)" if r.get("shared_from") else "")
            lines.append(f"| {name} | {kept} | {r['encode_ms']:.0f} | {r['prefill_ms']:.0f} | "
                         f"{r['ttft_ms']:.0f} ({r.get('ttft_ratio', float('nan')):.2f}) | "
                         f"{r['decode_tok_s']:.2f} ({r.get('decode_ratio', float('nan')):.2f}) | "
                         f"{r['peak_rss_mib']:.0f} | {r['ttft_cpu_share']:.2f} / {r['decode_cpu_share']:.2f} |")
        lines.append("\nCPU share: CPU time of the process / (wall time x threads) while it made its first token / "
                     "decoded; near 1.0 means it had its cores to itself.")
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
                    help="text shape:outtype pairs (shapes: %s; outtypes f16, q8_0)" % ", ".join(TEXT_SHAPES))
    ap.add_argument("--peers", default="llama.cpp,pyvtrim,fastv,transformers")
    ap.add_argument("--threads", type=int, default=2)
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
    ap.add_argument("--child", help=argparse.SUPPRESS)                                    # internal
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        r = CHILDREN[spec["peer"]](spec)
        r["peak_rss_mib"] = peak_rss_mib()
        Path(spec["result"]).write_text(json.dumps(r))
        return 0
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
                  reps=args.reps, rounds=args.rounds, nice=args.nice, quick=args.quick, models=[])
    from pyvtrim import _ffi

    report["pyvtrim_library"] = str(_ffi.find_library())
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
            plan.append((py, dict(base, peer="llama.cpp"), "llama.cpp"))
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
