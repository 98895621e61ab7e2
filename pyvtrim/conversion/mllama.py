"""Llama-3.2-Vision (HF MllamaForConditionalGeneration) -> one GGUF, arch "mllama".

Text: a Llama stack in which the layers listed in mllama.cross_attention_layers are gated
cross-attention layers (no RoPE, q/k RMS norms per head) instead of self-attention layers.
Self-attention layers use llama.cpp's names with Q/K rows permuted for ggml's RoPE; cross layers use
blk.N.cross_attn_*. Vision: a tiled ViT (local layers v.blk.N, gated global layers v.global.blk.N,
gated tile and position embeddings), whose output is the last global layer concatenated with the
intermediate local layers, projected by mm.weight/mm.bias. The tokenizer is Llama-3's byte-level BPE.

HF names: transformers 4.x checkpoints (language_model.model..., language_model.lm_head, vision_model...,
multi_modal_projector...) and transformers 5.x in-memory names (model.language_model..., lm_head,
model.vision_model..., model.multi_modal_projector...).

Notes for the runtime (what HF's modeling code does with these tensors):
  * the vision output per position is [final global hidden (d), then the intermediate layers
    INTERLEAVED: column d + i*n_inter + j is feature i of intermediate_layers_indices[j]] (torch.stack
    on the last axis, then a reshape), so mm.weight's columns follow that order;
  * intermediate_layers_indices index the local layers' outputs (0 = after the first layer); we store
    them non-negative;
  * v.pre_ln / v.post_ln are nn.LayerNorm with the default eps 1e-5, not vision norm_eps
    (mllama.vision.attention.layer_norm_epsilon is the encoder layers' eps).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .base import canonical_names as base_canonical_names
from .base import (ROLE_EMBED, ROLE_MATRIX, ROLE_VECTOR, ConversionError, PlannedTensor, Progress,
                   file_type_for, read_json, write_gguf)
from .llava import _Planner, permute_for_rope
from .tensors import TensorSource

ARCH = "mllama"
SUPPORTED = "MllamaForConditionalGeneration (model_type 'mllama', Llama-3.2-Vision)"
PIL_BILINEAR = 2
IMAGENET_STANDARD = [0.5, 0.5, 0.5]  # MllamaImageProcessor's class defaults for mean and std

# transformers' defaults (MllamaTextConfig / MllamaVisionConfig) for keys a config.json may leave out.
TEXT_DEFAULTS = dict(vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5,
                     max_position_embeddings=131072, tie_word_embeddings=False,
                     cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], rope_theta=500000.0)
VISION_DEFAULTS = dict(hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8,
                       attention_heads=16, num_channels=3, intermediate_size=5120, vision_output_dim=7680,
                       image_size=448, patch_size=14, norm_eps=1e-5, max_num_tiles=4,
                       intermediate_layers_indices=[3, 7, 15, 23, 30],
                       supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])

# The Llama-3.2-Vision-Instruct chat template, without its tool-calling branches: a system block
# (knowledge cutoff and date) only for conversations without images, <|image|> where an image part is.
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] | trim %}{%- endif %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}"
    "{%- set image_ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if image_ns.has_images and not system_message == \"\" %}"
    "{{- raise_exception(\"Prompting with images is incompatible with system messages.\") }}{%- endif %}"
    "{%- if not image_ns.has_images %}"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
    "{{- system_message }}{{- \"<|eot_id|>\" }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@dataclass
class MllamaTextHParams:
    hidden: int
    ff: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ctx: int
    rms_eps: float
    rope_theta: float
    rope_llama3: Optional[dict]   # factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    vocab_size: int               # lm_head rows (the embedding has more)
    cross_layers: List[int]
    tie_embeddings: bool


@dataclass
class MllamaVisionHParams:
    hidden: int
    ff: int
    n_layers: int
    n_global_layers: int
    n_heads: int
    image_size: int
    patch_size: int
    ln_eps: float
    max_tiles: int
    intermediate_layers: List[int]
    output_dim: int
    aspect_ratios: List[List[int]]   # [[h, w], ...] in tiles; aspect ratio id = index + 1

    @property
    def n_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def n_aspect_ids(self) -> int:  # rows of the tile embeddings: id 0 is "no image"
        return len(self.aspect_ratios) + 1


@dataclass
class MllamaHParams:
    text: MllamaTextHParams
    vision: MllamaVisionHParams
    image_token_id: int
    name: str


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------


def is_mllama(cfg: dict) -> bool:
    return "MllamaForConditionalGeneration" in (cfg.get("architectures") or []) or cfg.get("model_type") == "mllama"


def _int(value, what: str, where: str) -> int:
    if isinstance(value, (list, tuple)):  # image_size / patch_size may be [h, w]
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"{where}: {what} {value!r} is unsupported (only square)")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value <= 0:
        raise ConversionError(f"{where}: {what} {value!r} is not a positive integer")
    return int(value)


def _rope(tc: dict, where: str):
    """(rope_theta, llama3 scaling or None) from transformers 5's rope_parameters or 4.x's keys."""
    rp = tc.get("rope_parameters")
    scaling = tc.get("rope_scaling")
    theta = tc.get("rope_theta")
    if isinstance(rp, dict):
        scaling = scaling or rp
        theta = rp.get("rope_theta", theta)
    theta = float(theta if theta is not None else TEXT_DEFAULTS["rope_theta"])
    if not isinstance(scaling, dict):
        return theta, None
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype in (None, "default"):
        return theta, None
    if rtype != "llama3":
        raise ConversionError(f"{where}: RoPE scaling type {rtype!r} is not supported (only 'llama3')")
    llama3 = dict(factor=float(scaling.get("factor", 8.0)),
                  low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                  high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                  original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))
    if llama3["high_freq_factor"] <= llama3["low_freq_factor"] or llama3["factor"] <= 0:
        raise ConversionError(f"{where}: llama3 RoPE scaling {scaling!r} is malformed")
    return theta, llama3


def llama3_rope_freq_factors(theta: float, head_dim: int, s: dict) -> np.ndarray:
    """Per-frequency divisors of RoPE's theta for Llama-3.1 scaling (ggml_rope_ext's freq_factors).

    HF divides inv_freq by `factor` for long wavelengths, keeps short ones and blends in between;
    the divisor is the ratio of the original to the scaled inverse frequency."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    old_ctx = s["original_max_position_embeddings"]
    lo, hi, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    low_freq_wavelen = old_ctx / lo
    high_freq_wavelen = old_ctx / hi
    out = []
    for f in inv_freq.astype(np.float64):
        wavelen = 2 * math.pi / f
        if wavelen < high_freq_wavelen:
            out.append(1.0)
        elif wavelen > low_freq_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def parse_mllama_config(cfg: dict, where: str = "config.json", name: Optional[str] = None) -> MllamaHParams:
    if not is_mllama(cfg):
        raise ConversionError(f"{where}: not a Llama-3.2-Vision config (supported: {SUPPORTED})")
    tc = dict(TEXT_DEFAULTS, **(cfg.get("text_config") or {}))
    if tc.get("model_type", "mllama_text_model") != "mllama_text_model":
        raise ConversionError(f"{where}: text model_type {tc.get('model_type')!r} is not supported")
    if tc.get("hidden_act") != "silu":
        raise ConversionError(f"{where}: text hidden_act {tc.get('hidden_act')!r} is not supported (only 'silu')")
    vc = dict(VISION_DEFAULTS, **(cfg.get("vision_config") or {}))
    if vc.get("model_type", "mllama_vision_model") != "mllama_vision_model":
        raise ConversionError(f"{where}: vision model_type {vc.get('model_type')!r} is not supported")
    if vc.get("hidden_act") != "gelu":
        raise ConversionError(f"{where}: vision hidden_act {vc.get('hidden_act')!r} is not supported (only 'gelu')")
    if vc.get("num_channels", 3) != 3:
        raise ConversionError(f"{where}: vision num_channels must be 3")
    if "attention_heads" not in (cfg.get("vision_config") or {}) and "num_attention_heads" in vc:
        vc["attention_heads"] = vc["num_attention_heads"]

    hidden = _int(tc["hidden_size"], "text hidden_size", where)
    n_heads = _int(tc["num_attention_heads"], "text num_attention_heads", where)
    n_layers = _int(tc["num_hidden_layers"], "text num_hidden_layers", where)
    if hidden % n_heads != 0:
        raise ConversionError(f"{where}: text hidden_size {hidden} is not a multiple of num_attention_heads {n_heads}")
    cross = tc.get("cross_attention_layers")
    if not isinstance(cross, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in cross):
        raise ConversionError(f"{where}: cross_attention_layers {cross!r} must be a list of layer indices")
    if sorted(set(cross)) != sorted(cross) or any(not 0 <= i < n_layers for i in cross):
        raise ConversionError(f"{where}: cross_attention_layers {cross} must be distinct indices below "
                              f"num_hidden_layers {n_layers}")
    theta, llama3 = _rope(tc, where)
    text = MllamaTextHParams(
        hidden=hidden, ff=_int(tc["intermediate_size"], "text intermediate_size", where), n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=_int(tc.get("num_key_value_heads") or n_heads, "num_key_value_heads", where),
        head_dim=hidden // n_heads, ctx=_int(tc["max_position_embeddings"], "max_position_embeddings", where),
        rms_eps=float(tc["rms_norm_eps"]), rope_theta=theta, rope_llama3=llama3,
        vocab_size=_int(tc["vocab_size"], "text vocab_size", where), cross_layers=sorted(cross),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", tc["tie_word_embeddings"])))
    if text.n_heads % text.n_kv_heads != 0:
        raise ConversionError(f"{where}: num_attention_heads {n_heads} is not a multiple of "
                              f"num_key_value_heads {text.n_kv_heads}")
    if text.head_dim % 2 != 0:
        raise ConversionError(f"{where}: head_dim {text.head_dim} must be even for RoPE")

    v_hidden = _int(vc["hidden_size"], "vision hidden_size", where)
    v_heads = _int(vc["attention_heads"], "vision attention_heads", where)
    v_layers = _int(vc["num_hidden_layers"], "vision num_hidden_layers", where)
    if v_hidden % v_heads != 0:
        raise ConversionError(f"{where}: vision hidden_size {v_hidden} is not a multiple of attention_heads {v_heads}")
    inter = vc.get("intermediate_layers_indices")
    if not isinstance(inter, list) or not inter or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in inter):
        raise ConversionError(f"{where}: intermediate_layers_indices {inter!r} must be a non-empty list of indices")
    if any(not -v_layers <= i < v_layers for i in inter):
        raise ConversionError(f"{where}: intermediate_layers_indices {inter} are outside the {v_layers}-layer tower")
    inter = [i % v_layers for i in inter]  # Python indexing in HF: -1 is the last local layer
    ratios = vc.get("supported_aspect_ratios")
    if not isinstance(ratios, list) or not ratios or not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) and x > 0 for x in r)
            for r in ratios):
        raise ConversionError(f"{where}: supported_aspect_ratios {ratios!r} must be a list of [h, w] tile counts")
    max_tiles = _int(vc["max_num_tiles"], "max_num_tiles", where)
    if any(h * w > max_tiles for h, w in ratios):
        raise ConversionError(f"{where}: supported_aspect_ratios {ratios} need more than max_num_tiles {max_tiles}")
    vision = MllamaVisionHParams(
        hidden=v_hidden, ff=_int(vc["intermediate_size"], "vision intermediate_size", where), n_layers=v_layers,
        n_global_layers=_int(vc["num_global_layers"], "num_global_layers", where), n_heads=v_heads,
        image_size=_int(vc["image_size"], "vision image_size", where),
        patch_size=_int(vc["patch_size"], "vision patch_size", where), ln_eps=float(vc["norm_eps"]),
        max_tiles=max_tiles, intermediate_layers=inter,
        output_dim=_int(vc["vision_output_dim"], "vision_output_dim", where),
        aspect_ratios=[[int(h), int(w)] for h, w in ratios])
    if vision.image_size % vision.patch_size != 0:
        raise ConversionError(f"{where}: vision image_size {vision.image_size} is not a multiple of patch_size "
                              f"{vision.patch_size}")
    if vision.output_dim != v_hidden * (1 + len(inter)):
        raise ConversionError(f"{where}: vision_output_dim {vision.output_dim} != hidden_size {v_hidden} x "
                              f"(1 + {len(inter)} intermediate layers)")
    image_token = cfg.get("image_token_index", cfg.get("image_token_id", 128256))
    if not isinstance(image_token, int) or isinstance(image_token, bool) or image_token < 0:
        raise ConversionError(f"{where}: image_token_index {image_token!r} is not a token id")
    return MllamaHParams(text=text, vision=vision, image_token_id=image_token,
                         name=name or cfg.get("_name_or_path") or "mllama")


def hf_aspect_ratios(max_tiles: int) -> List[List[int]]:
    """The [h, w] list MllamaImageProcessor derives from max_image_tiles; aspect ratio id = index + 1."""
    return [[a, b] for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def mllama_image_params(pp: Optional[dict], vision: MllamaVisionHParams, where: str) -> dict:
    """Image preprocessing settings (MllamaImageProcessor) with its defaults."""
    if pp is None:  # no preprocessor_config.json: the processor's defaults at the tower's tile size
        pp = {"size": {"height": vision.image_size, "width": vision.image_size}, "max_image_tiles": vision.max_tiles}
    size = pp.get("size", {"height": 224, "width": 224})
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or size.get("height") is None or size.get("height") != size.get("width"):
        raise ConversionError(f"{where}: size {size!r} is unsupported (Llama-3.2-Vision uses square tiles)")
    if int(size["height"]) != vision.image_size:
        raise ConversionError(f"{where}: tile size {size['height']} differs from the vision tower's image_size "
                              f"{vision.image_size}")
    if not pp.get("do_resize", True) or not pp.get("do_pad", True):
        raise ConversionError(f"{where}: do_resize=False / do_pad=False are not supported (nor by transformers)")
    max_tiles = pp.get("max_image_tiles", 4)
    if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles != vision.max_tiles:
        raise ConversionError(f"{where}: max_image_tiles {max_tiles!r} differs from the vision tower's "
                              f"max_num_tiles {vision.max_tiles}")
    if hf_aspect_ratios(max_tiles) != vision.aspect_ratios:
        raise ConversionError(f"{where}: the image processor's aspect ratios for {max_tiles} tiles "
                              f"{hf_aspect_ratios(max_tiles)} differ from config.json's supported_aspect_ratios "
                              f"{vision.aspect_ratios}")
    do_rescale = bool(pp.get("do_rescale", True))
    out = dict(
        do_resize=True,
        tile_size=int(size["height"]),
        resample=int(pp.get("resample", PIL_BILINEAR)),
        do_rescale=do_rescale,
        rescale_factor=float(pp.get("rescale_factor", 1 / 255)) if do_rescale else 1.0,
        do_normalize=bool(pp.get("do_normalize", True)),
        do_pad=True,
        do_convert_rgb=bool(pp.get("do_convert_rgb", True)),
        max_image_tiles=int(max_tiles),
        image_mean=[float(x) for x in pp.get("image_mean", IMAGENET_STANDARD)],
        image_std=[float(x) for x in pp.get("image_std", IMAGENET_STANDARD)],
    )
    if len(out["image_mean"]) != 3 or len(out["image_std"]) != 3:
        raise ConversionError(f"{where}: image_mean and image_std need 3 values")
    return out


# ------------------------------------------------------------------------------------------------
# Tensor names
# ------------------------------------------------------------------------------------------------

_PREFIXES = [
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.vision_model.", "vision."),
    ("vision_model.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
]
_IGNORED = re.compile(r"rotary_emb\.(inv_freq|original_inv_freq)$")


def canonical_names(names, where: str) -> Dict[str, str]:
    """canonical name -> HF name; unknown tensors are an error (we would silently drop them)."""
    return base_canonical_names(names, _PREFIXES, _IGNORED, "Llama-3.2-Vision", where)


def plan_text(p: _Planner, t: MllamaTextHParams, n_embd_rows: int) -> List[PlannedTensor]:
    H, F, D = t.hidden, t.ff, t.head_dim
    out = [p.take("text.embed_tokens.weight", "token_embd.weight", (n_embd_rows, H), ROLE_MATRIX)]
    cross = set(t.cross_layers)
    for i in range(t.n_layers):
        L, b = f"text.layers.{i}.", f"blk.{i}."
        out.append(p.take(L + "input_layernorm.weight", b + "attn_norm.weight", (H,), ROLE_VECTOR))
        if i in cross:
            A = L + "cross_attn."
            out += [
                p.take(A + "q_proj.weight", b + "cross_attn_q_proj.weight", (t.n_heads * D, H), ROLE_MATRIX),
                p.take(A + "k_proj.weight", b + "cross_attn_k_proj.weight", (t.n_kv_heads * D, H), ROLE_MATRIX),
                p.take(A + "v_proj.weight", b + "cross_attn_v_proj.weight", (t.n_kv_heads * D, H), ROLE_MATRIX),
                p.take(A + "o_proj.weight", b + "cross_attn_o_proj.weight", (H, t.n_heads * D), ROLE_MATRIX),
                p.take(A + "q_norm.weight", b + "cross_attn_q_norm.weight", (D,), ROLE_VECTOR),
                p.take(A + "k_norm.weight", b + "cross_attn_k_norm.weight", (D,), ROLE_VECTOR),
                p.take(L + "cross_attn_attn_gate", b + "cross_attn_attn_gate", (1,), ROLE_VECTOR),
                p.take(L + "cross_attn_mlp_gate", b + "cross_attn_mlp_gate", (1,), ROLE_VECTOR),
            ]
        else:
            A = L + "self_attn."
            out += [
                p.take(A + "q_proj.weight", b + "attn_q.weight", (t.n_heads * D, H), ROLE_MATRIX,
                       lambda w: permute_for_rope(w, t.n_heads)),
                p.take(A + "k_proj.weight", b + "attn_k.weight", (t.n_kv_heads * D, H), ROLE_MATRIX,
                       lambda w: permute_for_rope(w, t.n_kv_heads)),
                p.take(A + "v_proj.weight", b + "attn_v.weight", (t.n_kv_heads * D, H), ROLE_MATRIX),
                p.take(A + "o_proj.weight", b + "attn_output.weight", (H, t.n_heads * D), ROLE_MATRIX),
            ]
        out += [
            p.take(L + "post_attention_layernorm.weight", b + "ffn_norm.weight", (H,), ROLE_VECTOR),
            p.take(L + "mlp.gate_proj.weight", b + "ffn_gate.weight", (F, H), ROLE_MATRIX),
            p.take(L + "mlp.up_proj.weight", b + "ffn_up.weight", (F, H), ROLE_MATRIX),
            p.take(L + "mlp.down_proj.weight", b + "ffn_down.weight", (H, F), ROLE_MATRIX),
        ]
    out.append(p.take("text.norm.weight", "output_norm.weight", (H,), ROLE_VECTOR))
    if p.has("lm_head.weight"):
        out.append(p.take("lm_head.weight", "output.weight", (t.vocab_size, H), ROLE_MATRIX))
    elif t.tie_embeddings:  # lm_head is the embedding's first vocab_size rows
        rows = t.vocab_size
        load = p.take("text.embed_tokens.weight", "output.weight", (n_embd_rows, H), ROLE_MATRIX).load
        out.append(PlannedTensor("output.weight", (rows, H), ROLE_MATRIX, lambda: load()[:rows]))
    else:
        raise ConversionError(f"{p.where}: missing tensor 'lm_head.weight' and tie_word_embeddings is false")
    if t.rope_llama3 is not None:
        factors = llama3_rope_freq_factors(t.rope_theta, t.head_dim, t.rope_llama3)
        out.append(PlannedTensor("rope_freqs.weight", (t.head_dim // 2,), ROLE_VECTOR, lambda: factors))
    return out


def _plan_vision_layer(p: _Planner, v: MllamaVisionHParams, L: str, b: str, gated: bool) -> List[PlannedTensor]:
    H, F = v.hidden, v.ff
    out = []
    for hf_norm, g in (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2")):
        for kind in ("weight", "bias"):
            out.append(p.take(L + f"{hf_norm}.{kind}", b + f"{g}.{kind}", (H,), ROLE_VECTOR))
    for hf_proj, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_out")):
        out.append(p.take(L + f"self_attn.{hf_proj}.weight", b + f"{g}.weight", (H, H), ROLE_MATRIX))
    out += [
        p.take(L + "mlp.fc1.weight", b + "ffn_up.weight", (F, H), ROLE_MATRIX),
        p.take(L + "mlp.fc1.bias", b + "ffn_up.bias", (F,), ROLE_VECTOR),
        p.take(L + "mlp.fc2.weight", b + "ffn_down.weight", (H, F), ROLE_MATRIX),
        p.take(L + "mlp.fc2.bias", b + "ffn_down.bias", (H,), ROLE_VECTOR),
    ]
    if gated:
        out += [p.take(L + "gate_attn", b + "gate_attn", (1,), ROLE_VECTOR),
                p.take(L + "gate_ffn", b + "gate_ffn", (1,), ROLE_VECTOR)]
    return out


def plan_vision(p: _Planner, v: MllamaVisionHParams) -> List[PlannedTensor]:
    H, P, N, R, T = v.hidden, v.patch_size, v.n_positions, v.n_aspect_ids, v.max_tiles
    V = "vision."
    out = [
        p.take(V + "patch_embedding.weight", "v.patch_embd.weight", (H, 3, P, P), ROLE_EMBED),
        p.take(V + "class_embedding", "v.class_embd", (H,), ROLE_VECTOR),
        p.take(V + "gated_positional_embedding.embedding", "v.position_embd.weight", (N, H), ROLE_EMBED),
        p.take(V + "gated_positional_embedding.gate", "v.position_embd.gate", (1,), ROLE_VECTOR),
        p.take(V + "gated_positional_embedding.tile_embedding.weight", "v.tile_position_embd.weight",
               (R, T * N * H), ROLE_EMBED),
        p.take(V + "pre_tile_positional_embedding.embedding.weight", "v.pre_tile_position_embd.weight",
               (R, T * H), ROLE_EMBED),
        p.take(V + "pre_tile_positional_embedding.gate", "v.pre_tile_position_embd.gate", (1,), ROLE_VECTOR),
        p.take(V + "post_tile_positional_embedding.embedding.weight", "v.post_tile_position_embd.weight",
               (R, T * H), ROLE_EMBED),
        p.take(V + "post_tile_positional_embedding.gate", "v.post_tile_position_embd.gate", (1,), ROLE_VECTOR),
        p.take(V + "layernorm_pre.weight", "v.pre_ln.weight", (H,), ROLE_VECTOR),
        p.take(V + "layernorm_pre.bias", "v.pre_ln.bias", (H,), ROLE_VECTOR),
        p.take(V + "layernorm_post.weight", "v.post_ln.weight", (H,), ROLE_VECTOR),
        p.take(V + "layernorm_post.bias", "v.post_ln.bias", (H,), ROLE_VECTOR),
    ]
    for i in range(v.n_layers):
        out += _plan_vision_layer(p, v, f"{V}transformer.layers.{i}.", f"v.blk.{i}.", gated=False)
    for i in range(v.n_global_layers):
        out += _plan_vision_layer(p, v, f"{V}global_transformer.layers.{i}.", f"v.global.blk.{i}.", gated=True)
    return out


def plan_projector(p: _Planner, hp: MllamaHParams) -> List[PlannedTensor]:
    T, O = hp.text.hidden, hp.vision.output_dim
    return [p.take("projector.weight", "mm.weight", (T, O), ROLE_MATRIX),
            p.take("projector.bias", "mm.bias", (T,), ROLE_VECTOR)]


# ------------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------------


def add_mllama_kv(w, hp: MllamaHParams, vocab, image: dict, outtype: str) -> None:
    t, v = hp.text, hp.vision
    w.add_name(hp.name)
    w.add_file_type(file_type_for(outtype))
    if outtype == "q8_0":
        w.add_quantization_version(2)  # ggml's GGML_QNT_VERSION
    a = ARCH
    w.add_uint32(f"{a}.context_length", t.ctx)
    w.add_uint32(f"{a}.embedding_length", t.hidden)
    w.add_uint32(f"{a}.block_count", t.n_layers)
    w.add_uint32(f"{a}.feed_forward_length", t.ff)
    w.add_uint32(f"{a}.attention.head_count", t.n_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", t.n_kv_heads)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", t.rms_eps)
    w.add_float32(f"{a}.rope.freq_base", t.rope_theta)
    w.add_uint32(f"{a}.rope.dimension_count", t.head_dim)
    w.add_uint32(f"{a}.vocab_size", t.vocab_size)
    w.add_array(f"{a}.cross_attention_layers", [int(i) for i in t.cross_layers])

    V = f"{a}.vision."
    w.add_uint32(V + "image_size", v.image_size)
    w.add_uint32(V + "patch_size", v.patch_size)
    w.add_uint32(V + "embedding_length", v.hidden)
    w.add_uint32(V + "feed_forward_length", v.ff)
    w.add_uint32(V + "block_count", v.n_layers)
    w.add_uint32(V + "global_block_count", v.n_global_layers)
    w.add_uint32(V + "attention.head_count", v.n_heads)
    w.add_float32(V + "attention.layer_norm_epsilon", v.ln_eps)
    w.add_uint32(V + "max_num_tiles", v.max_tiles)
    w.add_array(V + "intermediate_layers_indices", [int(i) for i in v.intermediate_layers])
    w.add_uint32(V + "vision_output_dim", v.output_dim)
    w.add_array(V + "supported_aspect_ratios", [int(x) for hw in v.aspect_ratios for x in hw])
    w.add_uint32(V + "num_channels", 3)
    w.add_array(V + "image_mean", [float(x) for x in image["image_mean"]])
    w.add_array(V + "image_std", [float(x) for x in image["image_std"]])

    w.add_uint32("vtrim.image_token_id", hp.image_token_id)
    w.add_string("vtrim.chat_format", "llama-3.2-vision")
    w.add_bool("vtrim.image.do_resize", image["do_resize"])
    w.add_uint32("vtrim.image.resample", image["resample"])
    w.add_bool("vtrim.image.do_rescale", image["do_rescale"])
    w.add_float32("vtrim.image.rescale_factor", image["rescale_factor"])
    w.add_bool("vtrim.image.do_normalize", image["do_normalize"])
    w.add_bool("vtrim.image.do_pad", image["do_pad"])
    w.add_bool("vtrim.image.do_convert_rgb", image["do_convert_rgb"])
    w.add_uint32("vtrim.image.max_image_tiles", image["max_image_tiles"])
    vocab.add_to_gguf(w)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def embedding_rows(src: TensorSource, names: Dict[str, str], where: str) -> int:
    hf = names.get("text.embed_tokens.weight")
    if hf is None:
        raise ConversionError(f"{where}: missing tensor 'embed_tokens.weight' (the text embedding)")
    return int(src.shape(hf)[0])


def write_mllama(out_path, hp: MllamaHParams, src: TensorSource, vocab, image: dict, outtype: str,
                 progress: Optional[Progress] = None, where: str = "model") -> List[Path]:
    names = canonical_names(src.names(), where)
    n_rows = embedding_rows(src, names, where)
    if n_rows < hp.text.vocab_size:
        raise ConversionError(f"{where}: embed_tokens has {n_rows} rows, fewer than text_config.vocab_size "
                              f"{hp.text.vocab_size}")
    vocab.fit_to(n_rows, where)
    if not 0 <= hp.image_token_id < n_rows:
        raise ConversionError(f"{where}: image token id {hp.image_token_id} is outside the vocabulary")
    p = _Planner(src, names, where)
    tensors = plan_text(p, hp.text, n_rows)
    tensors += plan_vision(p, hp.vision)
    tensors += plan_projector(p, hp)
    p.check_all_used()
    return [write_gguf(Path(out_path), ARCH, lambda w: add_mllama_kv(w, hp, vocab, image, outtype), tensors,
                       outtype, progress)]


def convert_mllama_dir(hf_dir, out_path, outtype: str = "f16", layout: str = "single",
                       progress: Optional[Progress] = None) -> List[Path]:
    from .tensors import SafetensorsSource
    from .vocab_bpe import load_hf_bpe_vocab

    hf_dir = Path(hf_dir)
    if layout != "single":
        raise ConversionError(f"layout {layout!r} is not available for Llama-3.2-Vision (llama.cpp has no mllama "
                              "support); use 'single'")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a directory")
    cfg = read_json(hf_dir / "config.json")
    hp = parse_mllama_config(cfg, str(hf_dir / "config.json"), name=cfg.get("_name_or_path") or hf_dir.name)
    image = mllama_image_params(read_json(hf_dir / "preprocessor_config.json", required=False), hp.vision,
                                str(hf_dir / "preprocessor_config.json"))
    src = SafetensorsSource(hf_dir)
    try:
        names = canonical_names(src.names(), str(hf_dir))
        n_rows = embedding_rows(src, names, str(hf_dir))
        vocab = load_hf_bpe_vocab(hf_dir, n_rows, dict(cfg.get("text_config") or {}))
        return write_mllama(out_path, hp, src, vocab, image, outtype, progress, where=str(hf_dir))
    finally:
        src.close()
