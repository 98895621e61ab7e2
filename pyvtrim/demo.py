"""A small random-weight LLaVA-1.5 GGUF for `pyvtrim demo`, made without torch or transformers.

The weights are numpy random arrays under HF's names, written by the same converter code as real
checkpoints (pyvtrim.conversion.llava.write_llava), so the demo exercises the real file layout.
Shapes: CLIP with ViT-L/336's geometry (336 px, 14 px patches: 576 image tokens) but 256 wide and
6 layers deep; a Llama with 8 layers, 512 wide, 8 heads (4 KV heads), ff 1408; the real Llama-2
vocabulary plus "<image>" (32000) and "<pad>" (32001), embedding padded to 32064 rows. ~60 M params.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

DEMO_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "text_config": {
        "model_type": "llama", "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
        "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 32064,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 6, "num_attention_heads": 4, "image_size": 336, "patch_size": 14,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 512,
    },
}
DEMO_NAME = "llava-demo (random weights)"
DEMO_SEED = 1234


def cache_dir() -> Path:
    return Path(os.environ.get("VTRIM_CACHE_DIR") or Path.home() / ".cache" / "pyvtrim")


def default_demo_path() -> Path:
    return cache_dir() / "demo" / "llava-demo.gguf"


def llama_vocab_path() -> Path:
    """The Llama-2 vocabulary GGUF shipped in pyvtrim/data (or the build's llama.cpp archive)."""
    from ._ffi import data_path

    name = "ggml-vocab-llama-spm.gguf"
    p = Path(data_path(name))
    if p.is_file():
        return p
    archive = cache_dir() / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "models" / name
    if archive.is_file():
        return archive
    raise FileNotFoundError(f"{name} is not installed (looked at {p} and {archive})")


def lazy_random(name: str, shape: tuple, scale: float, offset: float = 0.0, seed: int = DEMO_SEED):
    """A lazy random tensor (a function that makes it): standard normal * scale + offset, seeded by seed
    and the tensor's name, so a random-weight model file is the same on every machine."""
    def make():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= scale
        if offset:
            a += offset
        return a
    return make


def demo_tensors(cfg: dict = DEMO_CONFIG):
    """HF-named lazy tensors for the demo config (transformers 4.x checkpoint names)."""
    tc, vc = cfg["text_config"], cfg["vision_config"]
    H, F, L = tc["hidden_size"], tc["intermediate_size"], tc["num_hidden_layers"]
    nh, nkv = tc["num_attention_heads"], tc["num_key_value_heads"]
    hd = H // nh
    V = tc["vocab_size"]
    vh, vf, vl, P = vc["hidden_size"], vc["intermediate_size"], vc["num_hidden_layers"], vc["patch_size"]
    n_pos = (vc["image_size"] // P) ** 2 + 1
    t, shapes = {}, {}

    def add(name, shape, kind):
        # matrices: std 1/sqrt(fan_in) keeps activations of order 1; norms near 1; biases small.
        if kind == "matrix":
            fan_in = int(np.prod(shape[1:]))
            t[name] = lazy_random(name, shape, 1.0 / np.sqrt(fan_in))
        elif kind == "norm":
            t[name] = lazy_random(name, shape, 0.05, 1.0)
        elif kind == "bias":
            t[name] = lazy_random(name, shape, 0.02)
        else:  # embeddings
            t[name] = lazy_random(name, shape, 1.0 if name.endswith("embed_tokens.weight") else 0.1)
        shapes[name] = shape

    pre = "language_model.model."
    add(pre + "embed_tokens.weight", (V, H), "embed")
    for i in range(L):
        b = f"{pre}layers.{i}."
        add(b + "input_layernorm.weight", (H,), "norm")
        add(b + "self_attn.q_proj.weight", (nh * hd, H), "matrix")
        add(b + "self_attn.k_proj.weight", (nkv * hd, H), "matrix")
        add(b + "self_attn.v_proj.weight", (nkv * hd, H), "matrix")
        add(b + "self_attn.o_proj.weight", (H, nh * hd), "matrix")
        add(b + "post_attention_layernorm.weight", (H,), "norm")
        add(b + "mlp.gate_proj.weight", (F, H), "matrix")
        add(b + "mlp.up_proj.weight", (F, H), "matrix")
        add(b + "mlp.down_proj.weight", (H, F), "matrix")
    add(pre + "norm.weight", (H,), "norm")
    add("language_model.lm_head.weight", (V, H), "matrix")

    v = "vision_tower.vision_model."
    add(v + "embeddings.class_embedding", (vh,), "embed")
    add(v + "embeddings.patch_embedding.weight", (vh, 3, P, P), "matrix")
    add(v + "embeddings.position_embedding.weight", (n_pos, vh), "embed")
    add(v + "pre_layrnorm.weight", (vh,), "norm")
    add(v + "pre_layrnorm.bias", (vh,), "bias")
    for i in range(vl):
        b = f"{v}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            add(b + ln + ".weight", (vh,), "norm")
            add(b + ln + ".bias", (vh,), "bias")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(b + f"self_attn.{proj}.weight", (vh, vh), "matrix")
            add(b + f"self_attn.{proj}.bias", (vh,), "bias")
        add(b + "mlp.fc1.weight", (vf, vh), "matrix")
        add(b + "mlp.fc1.bias", (vf,), "bias")
        add(b + "mlp.fc2.weight", (vh, vf), "matrix")
        add(b + "mlp.fc2.bias", (vh,), "bias")
    add(v + "post_layernorm.weight", (vh,), "norm")
    add(v + "post_layernorm.bias", (vh,), "bias")
    add("multi_modal_projector.linear_1.weight", (H, vh), "matrix")
    add("multi_modal_projector.linear_1.bias", (H,), "bias")
    add("multi_modal_projector.linear_2.weight", (H, H), "matrix")
    add("multi_modal_projector.linear_2.bias", (H,), "bias")
    return t, shapes


def demo_vocab(n_vocab: int):
    from .conversion.llava import LLAVA_CHAT_TEMPLATE
    from .conversion.vocab import vocab_from_gguf

    v = vocab_from_gguf(llama_vocab_path())
    v.set_token(32000, "<image>", special=True)
    v.set_token(32001, "<pad>", special=True)
    v.pad_to(n_vocab)
    v.pad_id = 32001
    v.chat_template = LLAVA_CHAT_TEMPLATE
    return v


def write_demo_model(path: Optional[Union[str, os.PathLike]] = None, *, force: bool = False,
                     outtype: str = "f16", config: Optional[dict] = None) -> Path:
    """Write the demo GGUF (default ~/.cache/pyvtrim/demo/llava-demo.gguf) unless it exists; return its path.

    ``config`` replaces DEMO_CONFIG (an HF LLaVA config.json as a dict) to write random-weight models of other
    shapes, e.g. CLIP ViT-L/336 with a 7B Llama for benchmarks.
    """
    config = config or DEMO_CONFIG
    from .conversion.llava import image_params, parse_llava_config, write_llava
    from .conversion.tensors import ArraySource

    out = Path(path) if path is not None else default_demo_path()
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    hp = parse_llava_config(config, "demo config", name=DEMO_NAME)
    side = config["vision_config"]["image_size"]
    preprocessor = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    image = image_params(preprocessor, hp.vision, "demo preprocessor")
    tensors, shapes = demo_tensors(config)
    vocab = demo_vocab(config["text_config"]["vocab_size"])
    write_llava(out, hp, ArraySource(tensors, shapes), vocab, image, outtype, where="demo model")
    return out
