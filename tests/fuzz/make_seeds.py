#!/usr/bin/env python3
"""Seed corpora for the libFuzzer harnesses of tests/fuzz (tools/fuzz.sh runs this into its work folder).

    python tests/fuzz/make_seeds.py OUT_DIR      # OUT_DIR/{image,model_load,tokenize,chat_format,prefill}/ + OUT_DIR/models/

The GGUF seeds are tiny real models written by pyvtrim's converter: a LLaVA with a 513-token vocabulary (the
first 512 pieces of the real Llama-2 vocabulary and <image>), 32-wide towers of one or two layers, 28 px images
(4 patches), and the same text stack alone as a text-only llama. The tokenizer harness reads the real
vocabularies from the installed package (pyvtrim/data), the prefill harness the tiny LLaVA.
"""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

TINY = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 512,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 520, "bos_token_id": 1,
                    "eos_token_id": 2, "pad_token_id": 513},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32},
}


def tiny_vocab():
    from pyvtrim.conversion.llava import LLAVA_CHAT_TEMPLATE
    from pyvtrim.conversion.vocab import Vocab, vocab_from_gguf
    from pyvtrim.demo import llama_vocab_path

    full = vocab_from_gguf(llama_vocab_path())
    v = Vocab(tokens=full.tokens[:512], scores=full.scores[:512], types=full.types[:512], bos_id=1, eos_id=2,
              unk_id=0, chat_template=LLAVA_CHAT_TEMPLATE, source="fuzz seed")
    v.set_token(512, "<image>", special=True)
    v.set_token(513, "<pad>", special=True)
    v.pad_id = 513
    v.pad_to(TINY["text_config"]["vocab_size"])
    return v


def write_models(out: Path) -> dict:
    from pyvtrim.conversion.llava import image_params, parse_llava_config, write_llava
    from pyvtrim.conversion.tensors import ArraySource
    from pyvtrim.demo import demo_tensors

    out.mkdir(parents=True, exist_ok=True)
    hp = parse_llava_config(TINY, "fuzz seed", name="fuzz seed")
    side = TINY["vision_config"]["image_size"]
    image = image_params({"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}},
                         hp.vision, "fuzz seed")
    tensors, shapes = demo_tensors(TINY)
    paths = {}
    for outtype in ("f32", "q8_0"):
        if outtype == "q8_0" and TINY["text_config"]["hidden_size"] % 32:
            continue
        p = out / f"llava-tiny-{outtype}.gguf"
        write_llava(p, hp, ArraySource(tensors, shapes), tiny_vocab(), image, outtype, where="fuzz seed")
        paths[outtype] = p
    # the llama.cpp layout: a text-only llama GGUF and its mmproj
    p = out / "llava-tiny-pair.gguf"
    write_llava(p, hp, ArraySource(tensors, shapes), tiny_vocab(), image, "f32", layout="llama.cpp",
                where="fuzz seed")
    paths["text"] = p
    return paths


def images(out: Path) -> None:
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for w, h in ((8, 8), (3, 5), (33, 2)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        for fmt, ext, kw in (("PNG", "png", {}), ("JPEG", "jpg", {"quality": 80}), ("BMP", "bmp", {}),
                             ("GIF", "gif", {}), ("TGA", "tga", {}), ("PPM", "ppm", {})):
            buf = io.BytesIO()
            im.save(buf, fmt, **kw)
            (out / f"{w}x{h}.{ext}").write_bytes(buf.getvalue())
    Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), "L").save(out / "grey.png")
    Image.fromarray(rng.integers(0, 256, (4, 4, 4), dtype=np.uint8), "RGBA").save(out / "rgba.png")
    png = (out / "8x8.png").read_bytes()
    (out / "truncated.png").write_bytes(png[: len(png) // 2])


def tokenize(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    texts = ["Hello world", "USER: <image>\nWhat is in the picture? ASSISTANT:", "  leading spaces\n\ttabs",
             "émoji 🙂 and 中文 and \u0000 nul", "<s></s><unk><|begin_of_text|>", "a" * 200, "\xff\xfe bad utf8"]
    for i, t in enumerate(texts):
        raw = t.encode("utf-8", "surrogateescape") if i != 6 else b"\xff\xfe bad utf8 \xc3"
        for flags in (0, 3, 5):
            (out / f"t{i}-{flags}").write_bytes(bytes([flags, i % 4]) + raw)


def chat_format(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    questions = [b"What is in the picture?", b"", b"<image> twice <image>", "\u00e9 \U0001f642".encode(), b"\xff\xfe"]
    counts = [0, 1, 3, -1, 2**31 - 1, 100000]
    for m in range(4):
        for i, q in enumerate(questions):
            n = counts[(m + i) % len(counts)]
            (out / f"m{m}-q{i}").write_bytes(bytes([m]) + struct.pack("<i", n) + q)


def prefill(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)

    def seed(name, n_images, k, ratio, w, h, ids):
        (out / name).write_bytes(bytes([n_images, k, ratio, w, h]) + b"".join(struct.pack("<H", i) for i in ids))

    chat = [1, 3148, 1001, 29901, 0xFFFF, 13, 5618, 29973, 319, 1799, 9047, 13566, 29901]
    seed("text", 0, 0, 0, 8, 8, [1, 15043, 3186])
    seed("one-image", 1, 0, 0, 28, 28, [i % 512 for i in chat[:4]] + [0xFFFF] + [5, 6, 7])
    seed("fastv", 1, 2, 100, 40, 12, [1, 2, 0xFFFF, 9, 10, 11])
    seed("two-images", 2, 1, 150, 5, 47, [1, 0xFFFF, 3, 0xFFFF, 4])
    seed("mismatch", 2, 0, 0, 9, 9, [1, 0xFFFF, 3])


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(args[0])
    paths = write_models(out / "models")
    (out / "model_load").mkdir(parents=True, exist_ok=True)
    for name, p in paths.items():
        (out / "model_load" / p.name).write_bytes(p.read_bytes())
    images(out / "image")
    tokenize(out / "tokenize")
    chat_format(out / "chat_format")
    prefill(out / "prefill")
    (out / "models" / "paths.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
