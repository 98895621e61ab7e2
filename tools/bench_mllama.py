#!/usr/bin/env python3
"""Benchmark Trimmed Llama (cross-attention KV trimming) on a random-weight Llama-3.2-Vision ("mllama").

Speed does not depend on weight values, so the model is written with random weights (no download, no
torch/transformers): numpy arrays under HF's names go through pyvtrim.conversion.mllama's writer, as
pyvtrim.demo does for LLaVA. Shapes:

  * vision: the 11B's tower as it is: 1280 wide, ff 5120, 32 local + 8 gated global layers, 16 heads,
    560 px tiles of 14 px patches (1601 positions per tile), up to 4 tiles, intermediate layers
    [3, 7, 15, 23, 30], vision_output_dim 7680;
  * text: the 11B's width (4096, ff 14336, 32 heads / 8 KV heads, head_dim 128, Llama-3.1 RoPE scaling) but
    6 layers, cross-attention at [1, 3, 5] (the real model has 40 layers, 8 of them cross-attention);
  * the real Llama-3 vocabulary (the pinned archive's ggml-vocab-llama-bpe.gguf with Llama-3.1's special
    token names) plus <|image|> at 128256; embedding 128264 rows, lm_head 128256 rows.

Each configuration runs in its own process (so peak RSS is its own), one after the other, same prompt,
threads and images: a 560x560 image (1 tile) and a 1120x1120 image (4 tiles, 2x2). Writes JSON and prints
a Markdown table. The vision tower always runs all max_num_tiles tiles (HF pads), so one prefill costs
minutes on a 2-core CPU.

    python tools/bench_mllama.py                  # f16, 2 threads, 1 and 4 tiles, 32 decode tokens
    python tools/bench_mllama.py --quick          # 8 decode tokens
    python tools/bench_mllama.py --shape tiny     # a small tower and text stack: a smoke test in seconds
    python tools/bench_mllama.py --only-paired    # add the paired decode to an existing report

Decode speed is compared twice: in each configuration's own process (with its peak RSS), and side by side in
one process (--paired: one Model per configuration, single steps interleaved), the comparison that stands on
a machine whose speed drifts while other work comes and goes.

Configurations: "none", "trim:union:K" (each head keeps its top K of the features, the union is kept),
"trim:budget:F" (keep the fraction F by the head-mean score); append ":first" to trim the first
cross-attention layer's own cache too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import zlib
from pathlib import Path

from bench_common import best_of_prefills

SEED = 2025

# The 11B's vision tower (Llama-3.2-11B-Vision config.json).
VISION_11B = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                  attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4,
                  intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680)
# The 11B's text width, 6 layers deep with three cross-attention layers.
TEXT_11B_REDUCED = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=6,
                        cross_attention_layers=[1, 3, 5], num_attention_heads=32, num_key_value_heads=8)
SHAPES = {
    "11b": (VISION_11B, TEXT_11B_REDUCED),
    # The 11B's tower widths and tiles with 4 local + 1 global layers and a small text stack: the tower's
    # per-layer speed (tools/bench_vision_attn.py) in a fraction of the full tower's time.
    "tower5": (dict(VISION_11B, num_hidden_layers=4, num_global_layers=1, intermediate_layers_indices=[1, 3],
                    vision_output_dim=3840),
               dict(TEXT_11B_REDUCED, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=2)),
    # Same tile geometry (560 px, 1601 positions, 4 tiles), tiny widths: checks the tool itself quickly.
    "tiny": (dict(VISION_11B, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_global_layers=1,
                  attention_heads=4, intermediate_layers_indices=[1, 3], vision_output_dim=192),
             dict(TEXT_11B_REDUCED, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2)),
}

TEXT_VOCAB = 128256            # lm_head rows: Llama-3's 128000 BPE pieces + 256 specials
EMBED_ROWS = TEXT_VOCAB + 8    # MllamaTextModel's embed_tokens has vocab_size + 8 rows
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<|image|>", 128256
BOS_ID, EOM_ID, EOT_ID, PAD_ID = 128000, 128008, 128009, 128004
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]   # Llama-3.2-Vision's preprocessor_config.json
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

PROMPT = "Describe this picture in detail, then list every object you can see."
IMAGE_SIDES = {1: 560, 4: 1120}   # tiles -> side of a square image that the processor cuts into them


# ------------------------------------------------------------------------------------------------
# The random-weight model
# ------------------------------------------------------------------------------------------------


def bench_config(shape: str) -> dict:
    """An HF MllamaForConditionalGeneration config.json (as a dict) for the shape."""
    from pyvtrim.conversion.mllama import hf_aspect_ratios

    vision, text = SHAPES[shape]
    vc = dict(vision, model_type="mllama_vision_model", hidden_act="gelu", norm_eps=1e-5, num_channels=3,
              supported_aspect_ratios=hf_aspect_ratios(vision["max_num_tiles"]))
    tc = dict(text, model_type="mllama_text_model", hidden_act="silu", vocab_size=TEXT_VOCAB, rms_norm_eps=1e-5,
              max_position_embeddings=131072, rope_theta=500000.0,
              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192),
              bos_token_id=BOS_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "image_token_index": IMAGE_TOKEN_ID, "text_config": tc, "vision_config": vc}


def _gate(name: str):
    """A scalar gate of magnitude 0.3-1.2 and random sign (HF initialises some gates to 0: tanh(0) would
    switch those paths off)."""
    import numpy as np

    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    mag = 0.3 + 0.9 * rng.random()
    return np.asarray([mag if rng.random() < 0.5 else -mag], np.float32)


def mllama_tensors(cfg: dict):
    """HF-named (transformers 4.x checkpoint names) lazy random tensors and their shapes."""
    import numpy as np

    from pyvtrim.demo import lazy_random

    def _random(name, shape, scale, offset=0.0):
        return lazy_random(name, shape, scale, offset, seed=SEED)

    tc, vc = cfg["text_config"], cfg["vision_config"]
    H, F, L = tc["hidden_size"], tc["intermediate_size"], tc["num_hidden_layers"]
    nh, nkv = tc["num_attention_heads"], tc["num_key_value_heads"]
    D = H // nh
    vh, vf, P = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    n_pos = (vc["image_size"] // P) ** 2 + 1
    T = vc["max_num_tiles"]
    n_ar = len(vc["supported_aspect_ratios"]) + 1   # aspect ratio id 0 is "no image"
    t, shapes = {}, {}

    def add(name, shape, kind):
        # matrices: std 1/sqrt(fan_in) keeps activations of order 1; norms near 1; biases and
        # position/tile embeddings small; the token embedding of order 1.
        if kind == "matrix":
            t[name] = _random(name, shape, 1.0 / np.sqrt(int(np.prod(shape[1:]))))
        elif kind == "norm":
            t[name] = _random(name, shape, 0.05, 1.0)
        elif kind == "bias":
            t[name] = _random(name, shape, 0.02)
        elif kind == "gate":
            t[name] = _gate(name)
        else:
            t[name] = _random(name, shape, 1.0 if name.endswith("embed_tokens.weight") else 0.1)
        shapes[name] = shape

    pre = "language_model.model."
    add(pre + "embed_tokens.weight", (EMBED_ROWS, H), "embed")
    cross = set(tc["cross_attention_layers"])
    for i in range(L):
        b = f"{pre}layers.{i}."
        add(b + "input_layernorm.weight", (H,), "norm")
        a = b + ("cross_attn." if i in cross else "self_attn.")
        add(a + "q_proj.weight", (nh * D, H), "matrix")
        add(a + "k_proj.weight", (nkv * D, H), "matrix")
        add(a + "v_proj.weight", (nkv * D, H), "matrix")
        add(a + "o_proj.weight", (H, nh * D), "matrix")
        if i in cross:
            add(a + "q_norm.weight", (D,), "norm")
            add(a + "k_norm.weight", (D,), "norm")
            add(b + "cross_attn_attn_gate", (1,), "gate")
            add(b + "cross_attn_mlp_gate", (1,), "gate")
        add(b + "post_attention_layernorm.weight", (H,), "norm")
        add(b + "mlp.gate_proj.weight", (F, H), "matrix")
        add(b + "mlp.up_proj.weight", (F, H), "matrix")
        add(b + "mlp.down_proj.weight", (H, F), "matrix")
    add(pre + "norm.weight", (H,), "norm")
    add("language_model.lm_head.weight", (TEXT_VOCAB, H), "matrix")

    v = "vision_model."
    add(v + "patch_embedding.weight", (vh, 3, P, P), "matrix")
    add(v + "class_embedding", (vh,), "embed")
    add(v + "gated_positional_embedding.embedding", (n_pos, vh), "embed")
    add(v + "gated_positional_embedding.gate", (1,), "gate")
    add(v + "gated_positional_embedding.tile_embedding.weight", (n_ar, T * n_pos * vh), "embed")
    for which in ("pre", "post"):
        add(v + f"{which}_tile_positional_embedding.embedding.weight", (n_ar, T * vh), "embed")
        add(v + f"{which}_tile_positional_embedding.gate", (1,), "gate")
    for ln in ("layernorm_pre", "layernorm_post"):
        add(v + ln + ".weight", (vh,), "norm")
        add(v + ln + ".bias", (vh,), "bias")
    layers = [(f"{v}transformer.layers.{i}.", False) for i in range(vc["num_hidden_layers"])]
    layers += [(f"{v}global_transformer.layers.{i}.", True) for i in range(vc["num_global_layers"])]
    for b, gated in layers:
        for ln in ("input_layernorm", "post_attention_layernorm"):
            add(b + ln + ".weight", (vh,), "norm")
            add(b + ln + ".bias", (vh,), "bias")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            add(b + f"self_attn.{proj}.weight", (vh, vh), "matrix")
        add(b + "mlp.fc1.weight", (vf, vh), "matrix")
        add(b + "mlp.fc1.bias", (vf,), "bias")
        add(b + "mlp.fc2.weight", (vh, vf), "matrix")
        add(b + "mlp.fc2.bias", (vh,), "bias")
        if gated:
            add(b + "gate_attn", (1,), "gate")
            add(b + "gate_ffn", (1,), "gate")
    add("multi_modal_projector.weight", (H, vc["vision_output_dim"]), "matrix")
    add("multi_modal_projector.bias", (H,), "bias")
    return t, shapes


def llama3_vision_vocab(n_rows: int):
    """Llama-3.2-Vision's tokenizer as a BpeVocab: the archive's Llama-3 pieces and merges, Llama-3.1's
    special names, <|image|> at 128256, [PAD] rows up to the embedding's n_rows."""
    import gguf

    from pyvtrim._ffi import data_path
    from pyvtrim.conversion.mllama import MLLAMA_CHAT_TEMPLATE
    from pyvtrim.conversion.vocab import CONTROL
    from pyvtrim.conversion.vocab_bpe import BpeVocab, llama31_special_token
    from pyvtrim.demo import cache_dir

    name = "ggml-vocab-llama-bpe.gguf"
    path = Path(data_path(name))
    if not path.is_file():
        path = cache_dir() / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "models" / name
    r = gguf.GGUFReader(str(path))
    tokens = list(r.fields["tokenizer.ggml.tokens"].contents())
    types = [int(x) for x in r.fields["tokenizer.ggml.token_type"].contents()]
    merges = list(r.fields["tokenizer.ggml.merges"].contents())
    if len(tokens) != TEXT_VOCAB:
        raise RuntimeError(f"{path}: {len(tokens)} tokens, expected Llama-3's {TEXT_VOCAB}")
    for tid in range(BOS_ID, TEXT_VOCAB):
        tokens[tid] = llama31_special_token(tid)
        types[tid] = CONTROL
    v = BpeVocab(tokens=tokens, types=types, merges=merges, pre="llama-bpe", bos_id=BOS_ID, eos_id=EOT_ID,
                 pad_id=PAD_ID, eot_id=EOT_ID, eom_id=EOM_ID, add_bos=True, add_eos=False,
                 chat_template=MLLAMA_CHAT_TEMPLATE, source=str(path))
    v.set_token(IMAGE_TOKEN_ID, IMAGE_TOKEN, special=True)
    v.fit_to(n_rows, str(path))
    return v


def write_bench_model(path: Path, shape: str, outtype: str) -> Path:
    from pyvtrim.conversion.mllama import mllama_image_params, parse_mllama_config, write_mllama
    from pyvtrim.conversion.tensors import ArraySource

    cfg = bench_config(shape)
    hp = parse_mllama_config(cfg, "bench config", name=f"mllama-bench-{shape} (random weights)")
    side = cfg["vision_config"]["image_size"]
    pp = {"size": {"height": side, "width": side}, "max_image_tiles": cfg["vision_config"]["max_num_tiles"],
          "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 2}
    image = mllama_image_params(pp, hp.vision, "bench preprocessor")
    tensors, shapes = mllama_tensors(cfg)
    vocab = llama3_vision_vocab(EMBED_ROWS)
    t0 = time.time()

    def progress(i, n, name):
        if i % 50 == 0 or i == n:
            print(f"  {i}/{n} tensors, {time.time() - t0:.0f} s {name}", file=sys.stderr)

    write_mllama(path, hp, ArraySource(tensors, shapes), vocab, image, outtype, progress, where="bench model")
    return path


def model_path(shape: str, outtype: str) -> Path:
    from pyvtrim.demo import cache_dir

    path = cache_dir() / "bench" / f"mllama-vision11b-text4096x6-{outtype}.gguf" if shape == "11b" else \
        cache_dir() / "bench" / f"mllama-{shape}-{outtype}.gguf"
    if not path.is_file():
        t0 = time.time()
        print(f"writing {path} (random weights) ...", file=sys.stderr)
        write_bench_model(path, shape, outtype)
        print(f"  done in {time.time() - t0:.0f} s", file=sys.stderr)
    return path


# ------------------------------------------------------------------------------------------------
# One configuration (in its own process)
# ------------------------------------------------------------------------------------------------


def bench_image(side: int):
    import numpy as np

    y, x = np.mgrid[0:side, 0:side]
    return np.stack([(x * 255 // (side - 1)), (y * 255 // (side - 1)), ((x + y) % 256)], axis=-1).astype(np.uint8)


def parse_spec(spec: str):
    """ "none" | "trim:union:K" | "trim:budget:F", optionally ":first" -> a policy or None."""
    import pyvtrim

    if spec == "none":
        return None
    parts = spec.split(":")
    if parts[0] != "trim" or len(parts) not in (3, 4) or parts[1] not in ("union", "budget") or \
            (len(parts) == 4 and parts[3] != "first"):
        raise SystemExit(f"bad configuration {spec!r} (none, trim:union:K, trim:budget:F[:first])")
    first = len(parts) == 4
    if parts[1] == "union":
        return pyvtrim.TrimCrossAttn(k_ratio=float(parts[2]), mode="union", trim_first_layer=first)
    return pyvtrim.TrimCrossAttn(mode="budget", keep=float(parts[2]), trim_first_layer=first)


def run_one(path: str, spec: str, tiles: int, threads: int, n_decode: int, reps: int) -> dict:
    import resource

    import numpy as np

    import pyvtrim

    reduce = parse_spec(spec)
    img = bench_image(IMAGE_SIDES[tiles])
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    with pyvtrim.Model(path, n_ctx=1024, n_threads=threads) as m:
        load_s = time.perf_counter() - t0
        n_tiles = m.preprocess_info(img).get("n_tiles")
        ids = m.tokenize(m.chat_prompt(PROMPT, 1), add_special=False)
        if ids[0] != BOS_ID:
            ids = [BOS_ID] + ids
        best, logits = best_of_prefills(m, ids, [img], reduce, reps)
        # decode right after the last prefill: greedy, ignoring end-of-generation
        tok = int(np.argmax(logits))
        steps = []
        for _ in range(n_decode):
            t0 = time.perf_counter()
            tok = int(np.argmax(m.decode(tok)))
            steps.append(time.perf_counter() - t0)
        st = m.last_stats
        best["decode_tok_s"] = n_decode / sum(steps)
        # the median and the fastest step: robust to other processes taking the cores for a while
        best["decode_tok_s_median"] = 1.0 / float(np.median(steps))
        best["decode_tok_s_best"] = 1.0 / float(np.min(steps))
        best["decode_step_ms"] = [round(x * 1000.0, 1) for x in steps]
        best["decode_tok_s_c"] = st["n_decoded"] / (st["t_decode_ms"] / 1000.0) if st["t_decode_ms"] > 0 else None
        best["kv_cache_bytes_after_decode"] = st["kv_cache_bytes"]
        best["n_past_after_decode"] = st["n_past"]
        info = m.info
    best["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    best["loadavg_1m_start"] = load_start
    best["loadavg_1m_end"] = os.getloadavg()[0]   # other processes on the machine distort the timings
    best["load_s"] = load_s
    best["n_tiles"] = n_tiles
    best["info"] = {k: info[k] for k in ("n_layer", "n_embd", "n_vocab") if k in info}
    return best


def run_paired(path: str, specs: list, tiles: int, threads: int, n_decode: int) -> dict:
    """Decode the configurations side by side in one process: one Model each (the weights once per Model),
    all prefilled with the same image, then single steps interleaved (A B, B A, ...), so that whatever else
    slows the machine down lands on every configuration alike. The ratio per round is paired."""
    import numpy as np

    import pyvtrim

    img = bench_image(IMAGE_SIDES[tiles])
    models = [pyvtrim.Model(path, n_ctx=1024, n_threads=threads) for _ in specs]
    try:
        ids = models[0].tokenize(models[0].chat_prompt(PROMPT, 1), add_special=False)
        ids = ids if ids[0] == BOS_ID else [BOS_ID] + ids
        toks = [int(np.argmax(m.forward(ids, [img], reduce=parse_spec(spec)))) for m, spec in zip(models, specs)]
        steps = [[] for _ in specs]
        for r in range(n_decode):
            order = range(len(specs)) if r % 2 == 0 else reversed(range(len(specs)))
            for i in order:
                t0 = time.perf_counter()
                toks[i] = int(np.argmax(models[i].decode(toks[i])))
                steps[i].append(time.perf_counter() - t0)
        kept = [m.last_stats["n_image_tokens_kept"] for m in models]
    finally:
        for m in models:
            m.close()
    base = np.array(steps[0])
    return dict(n_tiles=tiles, configs=list(specs), n_decode=n_decode, n_image_tokens_kept=kept,
                decode_tok_s_median=[1.0 / float(np.median(x)) for x in steps],
                # per round: the base step's time over this configuration's (>1: this one decodes faster)
                paired_speed_ratio_median=[float(np.median(base / np.array(x))) for x in steps],
                decode_step_ms=[[round(t * 1000.0, 1) for t in x] for x in steps])


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def cross_kv_bytes(cfg: dict, n_images: int, kv_elem_bytes: int = 2) -> dict:
    """The untrimmed cross-attention cache: K and V of every cross layer over all max_num_tiles tiles of
    every image (padding tiles included, as HF caches them)."""
    tc, vc = cfg["text_config"], cfg["vision_config"]
    n_pos = (vc["image_size"] // vc["patch_size"]) ** 2 + 1
    rows = n_images * vc["max_num_tiles"] * n_pos
    row = 2 * kv_elem_bytes * tc["num_key_value_heads"] * (tc["hidden_size"] // tc["num_attention_heads"])
    n_cross = len(tc["cross_attention_layers"])
    return dict(rows_per_layer=rows, bytes_per_layer=rows * row, n_cross=n_cross, bytes=n_cross * rows * row,
                n_pos=n_pos)


def summarize(r: dict, base: dict, cfg: dict) -> None:
    """Ratios against the unreduced run of the same image, and the issue's targets."""
    full = cross_kv_bytes(cfg, 1)
    stage = next((s for s in r["stages"] if s["method"] == "trim"), None)
    r["cross_kv_bytes_full"] = stage["kv_bytes_full"] if stage else full["bytes"]
    r["cross_kv_bytes"] = stage["kv_bytes_kept"] if stage else full["bytes"]
    r["self_kv_bytes"] = r["kv_cache_bytes"] - r["cross_kv_bytes"]
    r["n_features"] = stage["n_in"] if stage else r["n_tiles"] * full["n_pos"]
    r["n_features_kept"] = stage["n_kept"] if stage else r["n_features"]
    r["kept_fraction"] = r["n_features_kept"] / r["n_features"]
    r["cross_kv_ratio"] = r["cross_kv_bytes"] / r["cross_kv_bytes_full"]
    # The target: trimmed layers at <= 0.5x, the first layer's own cache full unless it is trimmed too.
    trimmed_first = r["config"].endswith(":first")
    per_layer = full["bytes_per_layer"]
    r["cross_kv_target_bytes"] = (0 if trimmed_first else per_layer) + \
        0.5 * per_layer * (full["n_cross"] - (0 if trimmed_first else 1))
    r["cross_kv_target_met"] = r["cross_kv_bytes"] <= r["cross_kv_target_bytes"]
    for key, name in (("ttft_ms", "ttft_ratio"), ("encode_ms", "encode_ratio"), ("prefill_ms", "prefill_ratio"),
                      ("decode_tok_s", "decode_ratio"), ("decode_tok_s_median", "decode_median_ratio"),
                      ("decode_tok_s_best", "decode_best_ratio"), ("peak_rss_mib", "peak_rss_ratio")):
        r[name] = r[key] / base[key]
    # by the fastest step: the work per step is the same, the mean over 16 steps moves with whatever else
    # runs on a 2-core machine
    r["decode_no_slower"] = r["decode_tok_s_best"] >= base["decode_tok_s_best"]


def print_paired(report: dict) -> None:
    for p in report.get("paired_decode", []):
        print(f"\n{p['n_tiles']} tile(s), {p['n_decode']} decode steps interleaved in one process:\n")
        print("| config | features kept | decode tok/s (median step) | speed vs none (median of paired rounds) |")
        print("|---|---|---|---|")
        for c, k, t, r in zip(p["configs"], p["n_image_tokens_kept"], p["decode_tok_s_median"],
                              p["paired_speed_ratio_median"]):
            print(f"| {c} | {k} | {t:.2f} | {r:.3f} |")


def print_table(report: dict) -> None:
    print(f"\n{report['model']}, {report['threads']} threads, {report['n_decode']} decode tokens\n")
    print("| tiles | config | features kept | cross KV MiB (ratio) | TTFT s | encode s | prefill ms | "
          "decode tok/s: fastest step (ratio) / median / mean | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        best = r.get("decode_tok_s_best", r["decode_tok_s"])
        med = r.get("decode_tok_s_median", r["decode_tok_s"])
        print(f"| {r['n_tiles']} | {r['config']} | {r['n_features_kept']}/{r['n_features']} "
              f"({r['kept_fraction']:.2f}) | {r['cross_kv_bytes'] / 2**20:.1f} ({r['cross_kv_ratio']:.2f}) | "
              f"{r['ttft_ms'] / 1000:.1f} | {r['encode_ms'] / 1000:.1f} | {r['prefill_ms']:.0f} | "
              f"{best:.2f} ({r.get('decode_best_ratio', r['decode_ratio']):.2f}) / {med:.2f} / "
              f"{r['decode_tok_s']:.2f} | {r['peak_rss_mib']:.0f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="11b")
    ap.add_argument("--outtype", choices=["f16", "q8_0", "f32"], default="f16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32, help="decode tokens per configuration")
    ap.add_argument("--reps", type=int, default=1, help="prefills per configuration (the fastest counts)")
    ap.add_argument("--quick", action="store_true", help="8 decode tokens, one prefill")
    ap.add_argument("--tiles", default="1,4", help="tile counts (1: a 560x560 image, 4: 1120x1120)")
    ap.add_argument("--configs", default="none,trim:union:0.25,trim:budget:0.5")
    ap.add_argument("--out", default="bench/results/trim.json")
    ap.add_argument("--table", metavar="JSON", help="print the table of a saved report and exit")
    ap.add_argument("--paired", default="none,trim:budget:0.5", metavar="CONFIGS",
                    help="after the runs, decode these configurations side by side in one process, steps "
                         "interleaved (one Model each: keep the list short, every Model holds the weights); "
                         "'' skips it")
    ap.add_argument("--only-paired", action="store_true",
                    help="run only the paired decode and add it to the report at --out")
    ap.add_argument("--one", help=argparse.SUPPRESS)       # internal: path|spec|tiles, print JSON
    ap.add_argument("--one-paired", help=argparse.SUPPRESS)   # internal: path|specs|tiles, print JSON
    args = ap.parse_args(argv)
    if args.table:
        report = json.loads(Path(args.table).read_text())
        print_table(report)
        print_paired(report)
        return 0
    if args.quick:
        args.decode, args.reps = 8, 1
    if args.one_paired:
        path, specs, tiles = args.one_paired.split("|")
        print(json.dumps(run_paired(path, specs.split(","), int(tiles), args.threads, args.decode)))
        return 0
    if args.one:
        path, spec, tiles = args.one.split("|")
        print(json.dumps(run_one(path, spec, int(tiles), args.threads, args.decode, args.reps)))
        return 0

    tiles = [int(t) for t in args.tiles.split(",")]
    if any(t not in IMAGE_SIDES for t in tiles):
        raise SystemExit(f"--tiles: choose from {sorted(IMAGE_SIDES)}")
    specs = args.configs.split(",")
    if specs[0] != "none":
        raise SystemExit("--configs: the first configuration must be 'none' (the ratios' base)")
    path = model_path(args.shape, args.outtype)
    cfg = bench_config(args.shape)
    tc, vc = cfg["text_config"], cfg["vision_config"]
    results = []
    report = dict(model=path.name, shape=args.shape, outtype=args.outtype, threads=args.threads,
                  n_decode=args.decode, reps=args.reps, prompt=PROMPT,
                  text=dict((k, tc[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "cross_attention_layers", "num_attention_heads",
                                                   "num_key_value_heads")),
                  vision=dict((k, vc[k]) for k in VISION_11B),
                  machine=platform.machine(), cpu_count=os.cpu_count(), complete=False, results=results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only_paired:
        report = json.loads(out.read_text())
        tiles = [t for t in tiles if any(r["n_tiles"] == t for r in report["results"])]
    for n in tiles if not args.only_paired else []:
        base = None
        for spec in specs:
            cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--decode",
                   str(args.decode), "--reps", str(args.reps), "--one", f"{path}|{spec}|{n}"]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"{spec} ({n} tiles) failed with exit code {proc.returncode}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["config"] = spec
            r["wall_s"] = time.time() - t0
            base = base or r
            summarize(r, base, cfg)
            results.append(r)
            print(f"{n} tile(s) {spec}: ttft {r['ttft_ms'] / 1000:.1f} s (encode {r['encode_ms'] / 1000:.1f} s, "
                  f"prefill {r['prefill_ms']:.0f} ms), decode {r['decode_tok_s']:.2f} tok/s "
                  f"(median {r['decode_tok_s_median']:.2f}), cross KV "
                  f"{r['cross_kv_bytes'] / 2**20:.1f} MiB, kept {r['n_features_kept']}/{r['n_features']}",
                  file=sys.stderr)
            out.write_text(json.dumps(report, indent=2))   # after every configuration: a run takes hours

    report["paired_decode"] = []
    for n in tiles if args.paired else []:
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--decode", str(args.decode),
               "--one-paired", f"{path}|{args.paired}|{n}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"paired decode ({n} tiles) failed with exit code {proc.returncode}")
        p = json.loads(proc.stdout.strip().splitlines()[-1])
        report["paired_decode"].append(p)
        print(f"{n} tile(s) paired decode: " + ", ".join(
            f"{c} {t:.2f} tok/s (x{r:.3f})" for c, t, r in zip(p["configs"], p["decode_tok_s_median"],
                                                                p["paired_speed_ratio_median"])), file=sys.stderr)
        out.write_text(json.dumps(report, indent=2))

    report["complete"] = True
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print_paired(report)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
