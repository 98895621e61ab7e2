"""The `pyvtrim` command: chat with a model, run the demo, convert checkpoints, show a model's info.

    pyvtrim chat llava.gguf --image cat.jpg --prompt "What is on the table?"
    pyvtrim chat llava.gguf --image cat.jpg          # interactive, multi-turn; empty line, EOF or
                                                     # Ctrl-C at the prompt quits, Ctrl-C in an answer stops it
    pyvtrim demo                                     # the trained tiny VLM: a synthetic picture, 3 questions
    pyvtrim demo --fastv 2:0.5                       # the same with FastV, and what it kept
    pyvtrim demo --random-weights                    # a random-weight LLaVA of real-ish shape, end to end
    pyvtrim convert ...                              # HF -> GGUF (see `pyvtrim convert --help`)
    pyvtrim info llava.gguf

Answers go to stdout; prompts, timings and errors go to stderr, so `> answers.txt` keeps only answers.
A reader that goes away (`| head`) ends the command quietly with status 141, as SIGPIPE would.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, TextIO, Tuple

import numpy as np

DEMO_QUESTION = "What is in the picture?"


def _int_at_least(lo: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    return parse


def _ficoco_v_spec(text: str) -> Tuple[int, Optional[int]]:
    """--ficoco-v N or N:START_LAYER."""
    n, _, start = text.partition(":")
    try:
        tokens, layer = int(n), (int(start) if start else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N:START_LAYER, e.g. 64 or 64:12, got {text!r}") from None
    if tokens < 1 or (layer is not None and layer < 0):
        raise argparse.ArgumentTypeError(f"N must be >= 1 and START_LAYER >= 0, got {text!r}")
    return tokens, layer


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="CPU threads (default: all cores)")
    p.add_argument("--n-ctx", type=_int_at_least(0), default=4096,
                   help="tokens in the KV cache, image tokens included (0: the model's trained context)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where the weights and the compute go (auto: a GPU when the build has one)")
    p.add_argument("--kv-type", choices=["f16", "f32"], default="f16", help="element type of the KV cache")
    p.add_argument("--no-mmap", dest="use_mmap", action="store_false",
                   help="read the weights into memory instead of mapping the file")
    p.add_argument("--rpc", metavar="HOST:PORT,...", type=_rpc_list, default=None,
                   help="rpc-server hosts (`pyvtrim rpc-server` there) that take equal shares of the decoder layers")


def _rpc_list(text: str) -> List[str]:
    servers = [e.strip() for e in text.split(",")]
    for e in servers:
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"expected HOST:PORT[,HOST:PORT...], got {text!r}")
    return servers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvtrim", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"pyvtrim {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    chat = sub.add_parser("chat", help="ask questions about an image")
    chat.add_argument("model", help="GGUF file (text + vision, or the text part with --mmproj)")
    chat.add_argument("--image", required=True,
                      help="image file (JPEG, PNG, BMP, GIF, TGA, PNM; WebP, TIFF and the rest through Pillow)")
    chat.add_argument("--prompt", help="answer this one question and exit (default: interactive)")
    chat.add_argument("--mmproj", help="llama.cpp's separate vision GGUF")
    chat.add_argument("--max-tokens", type=_int_at_least(0), default=256, help="at most this many tokens an answer")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    chat.add_argument("--top-k", type=int, default=40)
    chat.add_argument("--top-p", type=float, default=0.95)
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--ficoco-v", metavar="N[:L]", type=_ficoco_v_spec, help="FiCoCo-V: merge each image's "
                      "patches inside the vision tower down to N tokens, from vision layer L on (default 12; "
                      "e.g. 64; LLaVA)")
    chat.add_argument("--fastv", metavar="K:R", help="FastV: drop the fraction R of the image tokens after layer K "
                      "(e.g. 2:0.5; LLaVA)")
    chat.add_argument("--trim", metavar="K_RATIO", type=float, help="Trimmed Llama: each head keeps its top K_RATIO "
                      "of the cross-attended image features (e.g. 0.25; Llama-3.2-Vision)")
    chat.add_argument("--ficoco-l", metavar="N[:L]", help="FiCoCo-L: merge each image's tokens inside the decoder, "
                      "from layer L on (default 4), down to N (e.g. 64; LLaVA)")
    chat.add_argument("--vlcache", metavar="B", type=float, help="VL-Cache: after the prefill keep a mean fraction B "
                      "of the KV cache per layer, chosen per layer and KV head (e.g. 0.1; LLaVA; after --fastv)")
    _add_runtime_args(chat)

    demo = sub.add_parser("demo", help="ask a synthvqa-trained tiny VLM about a synthetic picture")
    demo.add_argument("--seed", type=int, default=None, help="the picture's seed (default: a new one each run)")
    demo.add_argument("--model", help="a GGUF trained on pyvtrim.synthvqa (default: the shipped one)")
    demo.add_argument("--fastv", metavar="K:R", help="answer with FastV too (e.g. 2:0.5) and show what it kept")
    demo.add_argument("--random-weights", action="store_true",
                      help="run the random-weight demo model instead (the pipeline only; gibberish answers)")
    demo.add_argument("--max-tokens", type=_int_at_least(0), default=32, help="with --random-weights")
    demo.add_argument("--threads", type=_int_at_least(1), default=None, help="CPU threads (default: all cores)")

    sub.add_parser("convert", help="convert a Hugging Face checkpoint to GGUF", add_help=False)

    quant = sub.add_parser("quantize", help="quantize a GGUF's weight matrices (ggml's quantizers)")
    quant.add_argument("src", help="GGUF with f32/f16/bf16 weights (a model, a text file or an mmproj)")
    quant.add_argument("dst")
    quant.add_argument("type", choices=["q8_0", "q6_K", "q5_K_M", "q4_K_M", "q4_0", "bf16"],
                       help="the text tower's type (llama.cpp's per-tensor rules for it)")
    quant.add_argument("--vision-type", default="q8_0",
                       choices=["q8_0", "f16", "bf16", "same", "q6_K", "q5_K_M", "q4_K_M", "q4_0"],
                       help="the vision tower and projector (same: the text's base type)")
    quant.add_argument("--threads", type=_int_at_least(1), default=None)

    info = sub.add_parser("info", help="print what a GGUF model is (shapes, vocabulary, weight types)")
    info.add_argument("model")
    info.add_argument("--mmproj")
    info.add_argument("--memory", action="store_true",
                      help="what the model and a context hold (after one prefill of an image and a full batch)")
    info.add_argument("--n-ctx", type=_int_at_least(0), default=4096, help="with --memory: the context's size")
    info.add_argument("--kv-type", choices=["f16", "f32"], default="f16", help="with --memory")

    from .server.cli import add_serve_args

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (pip install \"pyvtrim[server]\")")
    add_serve_args(serve)
    _add_runtime_args(serve)

    sub.add_parser("rpc-server", add_help=False,
                   help="ggml's rpc-server: lend this host's CPU (or GPU) to a model loaded with --rpc elsewhere")
    return parser


# ---- reporting ----------------------------------------------------------------------------------

def _rate(n: float, ms: float) -> str:
    return f"{1000.0 * n / ms:.1f} tok/s" if ms > 0 and n > 0 else "-"


def format_stats(stats: Dict[str, Any], t_first_ms: Optional[float] = None) -> str:
    """One line of what the last answer cost, from Model.last_stats."""
    parts = [
        f"prompt {stats['n_prompt_tokens']} tok ({stats['n_image_tokens']} image, "
        f"{stats['n_image_tokens_kept']} kept)",
        f"encode {stats['t_encode_ms']:.0f} ms",
        f"prefill {stats['t_prefill_ms']:.0f} ms ({_rate(stats['n_prompt_tokens'], stats['t_prefill_ms'])})",
    ]
    if t_first_ms is not None:
        parts.append(f"first token {t_first_ms:.0f} ms")
    for st in stats.get("stages", []):
        # an after-prefill stage counts cached positions (per KV head), the others image tokens
        what = "cached rows per KV head" if st["hook"] == "after_prefill" else "image tokens"
        parts.append(f"{st['method']} at layer {st['layer']}: {st['n_kept']}/{st['n_in']} {what} kept")
    parts += [
        f"decode {stats['n_decoded']} tok in {stats['t_decode_ms']:.0f} ms "
        f"({_rate(stats['n_decoded'], stats['t_decode_ms'])})",
        f"KV {stats['kv_cache_bytes'] / 2**20:.2f} MiB",
        f"stopped: {stats.get('finish_reason') or 'interrupted'}",
    ]
    return "[" + ", ".join(parts) + "]"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pyvtrim")
    except Exception:  # a source checkout without installed metadata
        return "unknown"


def _print_stream(pieces: Iterable[str], out: TextIO, t_start: float) -> Optional[float]:
    """Writes pieces as they come; returns ms from t_start to the first piece (None if none came).
    Ctrl-C stops the stream (it is closed, so its reply ends where it was) and propagates."""
    t_first: Optional[float] = None
    try:
        for piece in pieces:
            if t_first is None:
                t_first = 1000.0 * (time.perf_counter() - t_start)
            out.write(piece)
            out.flush()
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
        out.write("\n")
        out.flush()
    return t_first


# ---- commands -----------------------------------------------------------------------------------

def reduce_of(args: argparse.Namespace) -> List[Any]:
    """The reduction policies the flags ask for, in the order they apply (a command without a flag: none)."""
    from .reduce import FastV, FiCoCoL, FiCoCoV, TrimCrossAttn, VLCache

    for flag in ("ficoco_v", "fastv", "trim", "ficoco_l", "vlcache"):
        if not hasattr(args, flag):
            setattr(args, flag, None)
    policies: List[Any] = []
    if args.ficoco_v is not None:
        tokens, layer = args.ficoco_v
        policies.append(FiCoCoV(tokens=tokens) if layer is None else FiCoCoV(tokens=tokens, start_layer=layer))
    if args.fastv:
        try:
            k, r = args.fastv.split(":")
            policies.append(FastV(k=int(k), ratio=float(r)))
        except ValueError:
            raise SystemExit(f"pyvtrim chat: --fastv {args.fastv!r}: expected K:R, e.g. 2:0.5") from None
    if args.trim is not None:
        policies.append(TrimCrossAttn(k_ratio=args.trim))
    if args.ficoco_l:
        try:
            n, _, start = args.ficoco_l.partition(":")
            policies.append(FiCoCoL(tokens=int(n), start_layer=int(start) if start else 4))
        except ValueError:
            raise SystemExit(f"pyvtrim chat: --ficoco-l {args.ficoco_l!r}: expected N or N:L, e.g. 64") from None
    if args.vlcache is not None:
        if not args.vlcache > 0:
            raise SystemExit(f"pyvtrim chat: --vlcache {args.vlcache}: the budget must be > 0 (e.g. 0.1)")
        policies.append(VLCache(budget=args.vlcache))
    return policies


def cmd_chat(args: argparse.Namespace) -> int:
    from .model import Model

    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, reduce=reduce_of(args) or None)
    with Model(args.model, mmproj=args.mmproj, n_ctx=args.n_ctx, n_threads=args.threads,
               device=args.device, kv_type=args.kv_type, rpc=args.rpc, use_mmap=args.use_mmap) as m:
        if args.prompt is not None:
            t0 = time.perf_counter()
            t_first = _print_stream(m.chat(args.image, args.prompt, stream=True, **sampling), sys.stdout, t0)
            print(format_stats(m.last_stats, t_first), file=sys.stderr)
            return 0

        with m.start_chat(**sampling) as chat:
            return _interactive(m, chat, args.image)


def _interactive(m: Any, chat: Any, image: Optional[str]) -> int:
    """Questions from stdin, one per line, in one conversation; the first turn carries the image.
    When the context is full the oldest turns are dropped (Chat does it) and a notice says so."""
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session
            sys.stderr.write("\n")
            return 130
        question = line.strip()
        if not question:
            return 0
        t0 = time.perf_counter()
        dropped_before = chat.turns_dropped
        try:
            pieces: Iterator[str] = chat.ask(question, image, stream=True)
        except ValueError as e:  # e.g. this turn alone does not fit in n_ctx: say so, go on
            print(f"pyvtrim chat: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("[interrupted]", file=sys.stderr)
            continue
        image = None
        if chat.turns_dropped > dropped_before:
            n = chat.turns_dropped - dropped_before
            print(f"[the context is full: the oldest {n} turn{'s' if n > 1 else ''} of the conversation "
                  f"{'were' if n > 1 else 'was'} dropped{' (with the image)' if dropped_before == 0 else ''}]",
                  file=sys.stderr)
        try:
            t_first = _print_stream(pieces, sys.stdout, t0)
        except KeyboardInterrupt:  # Ctrl-C in an answer stops that answer only
            t_first = None
        print(format_stats(m.last_stats, t_first), file=sys.stderr)


def demo_image(size: int = 336) -> np.ndarray:
    """A synthetic RGB picture: a colour gradient with a white disc and a dark square."""
    y, x = np.mgrid[0:size, 0:size]
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[..., 0] = x * 255 // (size - 1)
    img[..., 1] = y * 255 // (size - 1)
    img[..., 2] = 160
    img[(x - size * 0.6) ** 2 + (y - size * 0.4) ** 2 < (size * 0.2) ** 2] = 255
    img[size * 6 // 10:size * 9 // 10, size // 10:size * 4 // 10] = 30
    return img


def cmd_demo(args: argparse.Namespace) -> int:
    from .synthdemo import trained_model_path

    trained = None if args.random_weights else (args.model or trained_model_path())
    if trained is not None:
        return _demo_trained(args, trained)
    if not args.random_weights:
        print("pyvtrim demo: no trained model in this installation; running the random-weight one",
              file=sys.stderr)
    return _demo_random(args)


def _demo_trained(args: argparse.Namespace, path: Any) -> int:
    from . import synthvqa as sv
    from . import synthdemo
    from .model import Model

    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 1_000_000 + 10_000
    scene = sv.sample(seed, 0)
    questions = sv.questions(scene, 3)
    fastv = reduce_of(argparse.Namespace(fastv=args.fastv, trim=None)) if args.fastv else []
    with Model(path, n_threads=args.threads, n_ctx=512) as m:
        info = m.info
        plain = synthdemo.ask(m, scene, questions)
        reduced = synthdemo.ask(m, scene, questions, reduce=fastv) if fastv else None
    print(f"model: {info['name']!r} ({path}), {info['n_params'] / 1e6:.2f} M params, "
          f"{plain[0].n_image_tokens} image tokens")
    print(f"picture (seed {seed}): {synthdemo.describe(scene)}")
    grid = int(round(plain[0].n_image_tokens ** 0.5))
    for line in synthdemo.patch_grid(scene, grid=grid):
        print("   " + line)
    for i, a in enumerate(plain):
        mark = "right" if a.correct else "WRONG"
        line = f"Q{i + 1} {a.question.text}  ->  {a.answer}  (truth: {a.question.answer}; {mark}; {a.ms:.0f} ms)"
        if reduced is not None:
            b = reduced[i]
            line += (f"\n   with FastV {args.fastv}: {b.answer} ({'right' if b.correct else 'WRONG'}; "
                     f"{b.n_kept}/{b.n_image_tokens} image tokens kept; {b.ms:.0f} ms)")
        print(line)
    if reduced is not None:
        print(f"what FastV {args.fastv} kept for Q1 (upper case / +: kept, lower case / .: dropped):")
        for line in synthdemo.patch_grid(scene, reduced[0].kept_patches, grid=grid):
            print("   " + line)
    n_ok = sum(a.correct for a in plain)
    print(f"{n_ok}/3 right" + (f"; with FastV {sum(b.correct for b in reduced)}/3" if reduced is not None else ""))
    return 0


def _demo_random(args: argparse.Namespace) -> int:
    from .demo import write_demo_model
    from .model import Model

    path = write_demo_model()
    with Model(path, n_threads=args.threads, n_ctx=2048) as m:
        info = m.info
        print(f"model: {path}", file=sys.stderr)
        print(f"question: {DEMO_QUESTION}", file=sys.stderr)
        t0 = time.perf_counter()
        t_first = _print_stream(m.chat(demo_image(), DEMO_QUESTION, max_tokens=args.max_tokens, stream=True),
                                sys.stdout, t0)
        stats = m.last_stats
    first = "-" if t_first is None else f"{t_first:.0f} ms"
    lines = [
        f"model:          {info['arch']} {info['name']!r}: {info['n_layer']} decoder layers, n_embd "
        f"{info['n_embd']}, {info['n_head']} heads ({info['n_head_kv']} KV), vocab {info['n_vocab']}; "
        f"vision {info['n_vision_layer']} layers at {info['image_size']} px; "
        f"{info['n_params'] / 1e6:.2f} M params, {info['n_bytes'] / 2**20:.1f} MiB",
        f"image tokens:   {stats['n_image_tokens']} (kept {stats['n_image_tokens_kept']}), "
        f"prompt {stats['n_prompt_tokens']} tokens",
        f"encode:         {stats['t_encode_ms']:.1f} ms",
        f"prefill:        {stats['t_prefill_ms']:.1f} ms "
        f"({_rate(stats['n_prompt_tokens'], stats['t_prefill_ms'])})",
        f"first token:    {first}",
        f"decode:         {stats['n_decoded']} tokens in {stats['t_decode_ms']:.1f} ms "
        f"({_rate(stats['n_decoded'], stats['t_decode_ms'])})",
        f"KV cache:       {stats['kv_cache_bytes'] / 2**20:.2f} MiB",
        "The weights are random, so the answer is gibberish: the demo shows the pipeline "
        "(image -> vision tower -> projector -> LLM -> streamed text), not a trained model.",
    ]
    print("\n".join(lines))
    return 0


def weight_types(path: str) -> str:
    """The tensor types of a GGUF file with their counts, most parameters first: "F16 x 201, F32 x 45"."""
    from gguf import GGUFReader

    count: Dict[str, int] = {}
    params: Dict[str, int] = {}
    for t in GGUFReader(path, "r").tensors:
        name = t.tensor_type.name
        count[name] = count.get(name, 0) + 1
        params[name] = params.get(name, 0) + int(t.n_elements)
    return ", ".join(f"{name} x {count[name]}" for name in sorted(count, key=lambda n: -params[n]))


def cmd_info(args: argparse.Namespace) -> int:
    from . import _ffi
    from .model import Model

    if args.memory:
        return _print_memory(args)
    with Model(args.model, mmproj=args.mmproj, n_ctx=256) as m:
        info = m.info
    rows = list(info.items())
    rows.append(("weight_types", weight_types(args.model)))
    if args.mmproj:
        rows.append(("mmproj_weight_types", weight_types(args.mmproj)))
    rows.append(("runtime", f"libvtrim {_ffi.version()} ({', '.join(_ffi.backends())})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _print_memory(args: argparse.Namespace) -> int:
    """The memory report: a context of --n-ctx, sized by a prefill of one image and a prompt that fills a
    prefill batch (the largest graphs a turn runs, but for attention over a nearly full cache)."""
    import numpy as np

    from .model import Model

    with Model(args.model, mmproj=args.mmproj, n_ctx=args.n_ctx, kv_type=args.kv_type) as m:
        info = m.info
        n_img = int(info.get("n_image_tokens", 0)) if info.get("image_token_id", -1) >= 0 else 0
        n_text = max(1, min(512, m.n_ctx - n_img - 8) - 8)
        image = np.full((int(info.get("image_size") or 32),) * 2 + (3,), 127, np.uint8)
        ids = m.tokenize(m.chat_prompt("a " * n_text, 1)) if n_img else m.tokenize("a " * n_text)
        ids = ids[:max(1, m.n_ctx - n_img - 1)]
        m.forward(ids, [image] if n_img and info.get("image_token_id") in ids else [])
        mem = m.memory()
        n_past = m.last_stats["n_past"]
    mib = 1 << 20
    weights = mem["weights_text"] + mem["weights_vision"] + mem["weights_projector"]
    rows = [("weights: text tower", mem["weights_text"]), ("weights: vision tower", mem["weights_vision"]),
            ("weights: projector", mem["weights_projector"]), ("  of those on RPC servers", mem["weights_rpc"]),
            ("  of those mapped from the file", mem["weights_mapped"]),
            (f"KV cache ({args.n_ctx} positions, {args.kv_type})", mem["kv_cache"]),
            ("cross-attention cache (in use)", mem["cross_cache"]),
            (f"compute buffers (after a {n_past}-position prefill)", mem["compute"]),
            ("image embeddings (host)", mem["image_embeddings"]), ("logits (host)", mem["host_logits"])]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value / mib:10.1f} MiB")
    total = weights - mem["weights_rpc"] + sum(v for k, v in mem.items() if not k.startswith("weights"))
    print(f"{'total here':<{width}}  {total / mib:10.1f} MiB  (KV per 1000 positions: "
          f"{mem['kv_cache'] / max(1, args.n_ctx) * 1000 / mib:.1f} MiB)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize

    t0 = time.perf_counter()
    r = quantize(args.src, args.dst, args.type, vision_type=args.vision_type, n_threads=args.threads)
    print(f"{args.dst}: {r['n_tensors']} tensors, {r['n_quantized']} quantized, {r['n_fallback']} with a "
          f"fallback type; {r['bytes_in'] / 2**20:.1f} MiB -> {r['bytes_out'] / 2**20:.1f} MiB in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_convert(argv: List[str]) -> int:
    from .conversion import main as convert_main  # type: ignore[attr-defined]

    rc = convert_main(argv)
    return int(rc or 0)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")  # a reply is printed even on a terminal that lacks its characters
    if argv and argv[0] == "convert":  # its options belong to the converter
        return cmd_convert(argv[1:])
    if argv and argv[0] == "rpc-server":  # ggml's program, with its own options (-H host -p port -t threads)
        from .native_cli import run

        return run("vtrim-rpc-server", argv[1:])

    args = build_parser().parse_args(argv)
    from .errors import VtrimError

    try:
        if args.command == "serve":
            from .server.cli import cmd_serve

            return cmd_serve(args)
        return {"chat": cmd_chat, "demo": cmd_demo, "info": cmd_info, "quantize": cmd_quantize}[args.command](args)
    except BrokenPipeError:
        return _reader_gone()
    except (VtrimError, OSError) as e:
        print(f"pyvtrim {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _reader_gone() -> int:
    """stdout's reader closed the pipe: no traceback, and no second error when Python flushes at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
