"""One configuration of tools/bench_peers.py, run in a child process of the peer's own Python:
    python tools/peers_child.py '<spec JSON>'
measures it and writes the result JSON the spec names (peak RSS included)."""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from pathlib import Path

from peers_env import QUESTION


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
                        first_token=tok, ttft_cpu_share=span.share(s["threads"]),
                        prefill_flops=st["prefill_flops"], n_embd=m.info["n_embd"],
                        weights_text_bytes=m.memory()["weights_text"])
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

    if s.get("no_extra_bufts"):
        # llama.cpp's weight repacking (its "extra buffer types": CPU_REPACK, AMX) off, as --no-repack does;
        # Llama() takes no such argument, so its default model params are wrapped
        import llama_cpp.llama_cpp as low   # the module whose function Llama() calls

        default_params = low.llama_model_default_params

        def no_extra_bufts():
            p = default_params()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = no_extra_bufts

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




def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(args[0])
    r = CHILDREN[spec["peer"]](spec)
    r["peak_rss_mib"] = peak_rss_mib()
    Path(spec["result"]).write_text(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
