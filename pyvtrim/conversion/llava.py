"""LLaVA-1.5 (HF LlavaForConditionalGeneration: CLIP ViT + 2-layer MLP projector + Llama) -> GGUF.

Two layouts:
  * "single" (ours): one file, text part under llama.cpp's names (arch "llama"), vision tower and
    projector under llama.cpp's mmproj names (v.*, mm.*, clip.* keys) with ALL CLIP layers and
    HF's meaning of fc1/fc2, plus vtrim.* keys (feature layer, image preprocessing, chat format).
  * "llama.cpp": the two files llama.cpp's legacy LLaVA tools produce (see llamacpp_layout.py).

The input is a name -> tensor source in HF naming (transformers 4.x checkpoint names such as
language_model.model.layers.0... or 5.x in-memory names such as model.language_model.layers.0...),
so the demo model, which is made from numpy arrays, goes through the same code as real checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .base import canonical_names as base_canonical_names
from .base import (ROLE_EMBED, ROLE_MATRIX, ROLE_VECTOR, ConversionError, PlannedTensor, Progress,
                   file_type_for, read_json, write_gguf)
from .tensors import TensorSource
from .vocab import Vocab

# transformers' defaults for keys a config.json may leave out (LlamaConfig, CLIPVisionConfig, and the
# vision tower LlavaConfig builds when vision_config is absent).
LLAMA_DEFAULTS = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=32000,
                      tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False)
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, projection_dim=512)
LLAVA_VISION_DEFAULTS = dict(CLIP_VISION_DEFAULTS, hidden_size=1024, intermediate_size=4096, patch_size=14,
                             image_size=336, num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PIL_BICUBIC = 3

# The LLaVA-1.5 chat template of llava-hf/llava-1.5-7b-hf (its chat_template.json); the demo model
# and the test fixtures carry it so tokenizer.chat_template is present.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SUPPORTED = "LlavaForConditionalGeneration (model_type 'llava') with a Llama text model and a CLIP vision tower"


@dataclass
class TextHParams:
    hidden: int
    ff: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ctx: int
    rms_eps: float
    rope_theta: float
    vocab_size: int
    tie_embeddings: bool


@dataclass
class VisionHParams:
    hidden: int
    ff: int
    n_layers: int
    n_heads: int
    image_size: int
    patch_size: int
    ln_eps: float
    act: str
    projection_dim: int  # CLIP's own projection_dim (unused by LLaVA; llama.cpp's mmproj records it)

    @property
    def n_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class LlavaHParams:
    text: TextHParams
    vision: VisionHParams
    feature_layer: int
    feature_select: str
    projector_act: str
    projector_bias: bool
    image_token_id: int
    name: str


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------


def check_architecture(cfg: dict, where: str) -> None:
    archs = cfg.get("architectures")
    mtype = cfg.get("model_type")
    if archs is not None and "LlavaForConditionalGeneration" not in archs:
        raise ConversionError(f"{where}: unsupported architecture {archs} (supported: {SUPPORTED})")
    if mtype is not None and mtype != "llava":
        raise ConversionError(f"{where}: unsupported model_type {mtype!r} (supported: {SUPPORTED})")
    if archs is None and mtype is None:
        raise ConversionError(f"{where}: neither 'architectures' nor 'model_type' is set (supported: {SUPPORTED})")


def _rope_theta(tc: dict, where: str) -> float:
    # transformers 5 keeps RoPE settings in rope_parameters; 4.x in rope_theta / rope_scaling.
    rp = tc.get("rope_parameters")
    scaling = tc.get("rope_scaling")
    theta = tc.get("rope_theta")
    if isinstance(rp, dict):
        scaling = scaling or rp
        theta = rp.get("rope_theta", theta)
    if isinstance(scaling, dict):
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype not in (None, "default"):
            raise ConversionError(f"{where}: RoPE scaling type {rtype!r} is not supported")
    return float(theta if theta is not None else LLAMA_DEFAULTS["rope_theta"])


def parse_llava_config(cfg: dict, where: str = "config.json", name: Optional[str] = None) -> LlavaHParams:
    check_architecture(cfg, where)
    tc = dict(LLAMA_DEFAULTS, **(cfg.get("text_config") or {}))
    if tc.get("model_type", "llama") != "llama":
        raise ConversionError(f"{where}: text model_type {tc.get('model_type')!r} is not supported (only 'llama')")
    if tc.get("attention_bias") or tc.get("mlp_bias"):
        raise ConversionError(f"{where}: Llama attention_bias/mlp_bias is not supported")
    if tc.get("hidden_act") != "silu":
        raise ConversionError(f"{where}: text hidden_act {tc.get('hidden_act')!r} is not supported (only 'silu')")
    vc = cfg.get("vision_config")
    vc = dict(LLAVA_VISION_DEFAULTS if vc is None else CLIP_VISION_DEFAULTS, **(vc or {}))
    if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConversionError(f"{where}: vision model_type {vc.get('model_type')!r} is not supported "
                              "(only 'clip_vision_model')")
    if vc.get("hidden_act") not in ("gelu", "quick_gelu"):
        raise ConversionError(f"{where}: vision hidden_act {vc.get('hidden_act')!r} is not supported")
    if vc.get("num_channels", 3) != 3:
        raise ConversionError(f"{where}: vision num_channels must be 3")

    n_heads = int(tc["num_attention_heads"])
    hidden = int(tc["hidden_size"])
    head_dim = tc.get("head_dim") or hidden // n_heads
    text = TextHParams(
        hidden=hidden, ff=int(tc["intermediate_size"]), n_layers=int(tc["num_hidden_layers"]), n_heads=n_heads,
        n_kv_heads=int(tc.get("num_key_value_heads") or n_heads), head_dim=int(head_dim),
        ctx=int(tc["max_position_embeddings"]), rms_eps=float(tc["rms_norm_eps"]),
        rope_theta=_rope_theta(tc, where), vocab_size=int(tc["vocab_size"]),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", tc["tie_word_embeddings"])))
    if text.n_heads % text.n_kv_heads != 0:
        raise ConversionError(f"{where}: num_attention_heads {n_heads} is not a multiple of "
                              f"num_key_value_heads {text.n_kv_heads}")
    if text.head_dim % 2 != 0:
        raise ConversionError(f"{where}: head_dim {text.head_dim} must be even for RoPE")
    vision = VisionHParams(
        hidden=int(vc["hidden_size"]), ff=int(vc["intermediate_size"]), n_layers=int(vc["num_hidden_layers"]),
        n_heads=int(vc["num_attention_heads"]), image_size=int(vc["image_size"]), patch_size=int(vc["patch_size"]),
        ln_eps=float(vc["layer_norm_eps"]), act=str(vc["hidden_act"]), projection_dim=int(vc["projection_dim"]))
    if vision.image_size % vision.patch_size != 0:
        raise ConversionError(f"{where}: image_size {vision.image_size} is not a multiple of patch_size "
                              f"{vision.patch_size}")

    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ConversionError(f"{where}: vision_feature_layer {layer!r} is unsupported (only a single layer index)")
    if not -(vision.n_layers + 1) <= layer <= vision.n_layers:
        raise ConversionError(f"{where}: vision_feature_layer {layer} is outside the {vision.n_layers}-layer tower")
    select = cfg.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise ConversionError(f"{where}: vision_feature_select_strategy {select!r} is unsupported")
    act = cfg.get("projector_hidden_act", "gelu")
    if act not in ("gelu", "quick_gelu", "gelu_pytorch_tanh", "relu", "silu"):
        raise ConversionError(f"{where}: projector_hidden_act {act!r} is unsupported")
    image_token = cfg.get("image_token_id", cfg.get("image_token_index", 32000))
    return LlavaHParams(text=text, vision=vision, feature_layer=layer, feature_select=select, projector_act=act,
                        projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
                        image_token_id=int(image_token), name=name or cfg.get("_name_or_path") or "llava")


def image_params(pp: Optional[dict], vision: VisionHParams, where: str) -> dict:
    """Image preprocessing settings (CLIPImageProcessor / LlavaImageProcessor) with their defaults."""
    if pp is None:  # no preprocessor_config.json: CLIP's processing at the tower's own resolution
        pp = {"size": {"shortest_edge": vision.image_size},
              "crop_size": {"height": vision.image_size, "width": vision.image_size}}
    size = pp.get("size", {"shortest_edge": 224})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if not isinstance(size, dict) or "shortest_edge" not in size:
        if pp.get("do_resize", True):
            raise ConversionError(f"{where}: size {size!r} is unsupported (LLaVA-1.5 resizes the shortest edge)")
        size = {"shortest_edge": vision.image_size}
    crop = pp.get("crop_size", {"height": 224, "width": 224})
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if not isinstance(crop, dict) or "height" not in crop or "width" not in crop:
        raise ConversionError(f"{where}: crop_size {crop!r} is unsupported")
    do_rescale = bool(pp.get("do_rescale", True))
    out = dict(
        do_resize=bool(pp.get("do_resize", True)),
        shortest_edge=int(size["shortest_edge"]),
        resample=int(pp.get("resample", PIL_BICUBIC)),
        do_center_crop=bool(pp.get("do_center_crop", True)),
        crop_height=int(crop["height"]),
        crop_width=int(crop["width"]),
        do_rescale=do_rescale,
        rescale_factor=float(pp.get("rescale_factor", 1 / 255)) if do_rescale else 1.0,
        do_normalize=bool(pp.get("do_normalize", True)),
        do_pad=bool(pp.get("do_pad", False)),
        do_convert_rgb=bool(pp.get("do_convert_rgb", True)),
        image_mean=[float(x) for x in pp.get("image_mean", CLIP_MEAN)],
        image_std=[float(x) for x in pp.get("image_std", CLIP_STD)],
    )
    if len(out["image_mean"]) != 3 or len(out["image_std"]) != 3:
        raise ConversionError(f"{where}: image_mean and image_std need 3 values")
    return out


# ------------------------------------------------------------------------------------------------
# Tensor names
# ------------------------------------------------------------------------------------------------

# HF prefix -> canonical prefix. Longest first: transformers 4.x checkpoints, 5.x in-memory names,
# and the vision tower with or without CLIPVisionModel's "vision_model." level.
_PREFIXES = [
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
]
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def canonical_names(names, where: str) -> Dict[str, str]:
    """canonical name -> HF name; unknown tensors are an error (we would silently drop them)."""
    return base_canonical_names(names, _PREFIXES, _IGNORED, "LLaVA", where)


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K output rows so ggml's adjacent-pair RoPE equals HF's rotate_half RoPE.

    HF rotates dimension i with i + d/2 inside each head; ggml's normal mode rotates 2i with 2i+1.
    Interleaving the two halves of every head makes those the same pairs.
    """
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Planner:
    """Builds PlannedTensors from canonical names, checking presence and shapes."""

    def __init__(self, src: TensorSource, names: Dict[str, str], where: str):
        self.src, self.names, self.where, self.used = src, names, where, set()

    def has(self, canon: str) -> bool:
        return canon in self.names

    def take(self, canon: str, gguf_name: str, shape: tuple, role: str,
             transform: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> PlannedTensor:
        hf = self.names.get(canon)
        if hf is None:
            raise ConversionError(f"{self.where}: missing tensor {canon.split('.', 1)[1]!r} "
                                  f"(for {gguf_name}; HF name like *{canon.split('.', 1)[1]})")
        got = tuple(self.src.shape(hf))
        if got != tuple(shape):
            raise ConversionError(f"{self.where}: tensor {hf} has shape {got}, expected {tuple(shape)} "
                                  f"from config.json")
        self.used.add(canon)
        src = self.src

        def load():
            a = src.load(hf)
            return transform(a) if transform else a
        return PlannedTensor(gguf_name, tuple(shape), role, load)

    def zeros(self, gguf_name: str, shape: tuple) -> PlannedTensor:
        return PlannedTensor(gguf_name, tuple(shape), ROLE_VECTOR, lambda: np.zeros(shape, np.float32))

    def check_all_used(self, allowed_unused=()) -> None:
        left = sorted(set(self.names) - self.used - set(allowed_unused))
        if left:
            hf = [self.names[c] for c in left[:5]]
            raise ConversionError(f"{self.where}: tensors not used by the conversion: {', '.join(hf)}")


def plan_text(p: _Planner, t: TextHParams, n_vocab: int) -> List[PlannedTensor]:
    H, F, D = t.hidden, t.ff, t.head_dim
    out = [p.take("text.embed_tokens.weight", "token_embd.weight", (n_vocab, H), ROLE_MATRIX)]
    for i in range(t.n_layers):
        L = f"text.layers.{i}."
        b = f"blk.{i}."
        out += [
            p.take(L + "input_layernorm.weight", b + "attn_norm.weight", (H,), ROLE_VECTOR),
            p.take(L + "self_attn.q_proj.weight", b + "attn_q.weight", (t.n_heads * D, H), ROLE_MATRIX,
                   lambda w: permute_for_rope(w, t.n_heads)),
            p.take(L + "self_attn.k_proj.weight", b + "attn_k.weight", (t.n_kv_heads * D, H), ROLE_MATRIX,
                   lambda w: permute_for_rope(w, t.n_kv_heads)),
            p.take(L + "self_attn.v_proj.weight", b + "attn_v.weight", (t.n_kv_heads * D, H), ROLE_MATRIX),
            p.take(L + "self_attn.o_proj.weight", b + "attn_output.weight", (H, t.n_heads * D), ROLE_MATRIX),
            p.take(L + "post_attention_layernorm.weight", b + "ffn_norm.weight", (H,), ROLE_VECTOR),
            p.take(L + "mlp.gate_proj.weight", b + "ffn_gate.weight", (F, H), ROLE_MATRIX),
            p.take(L + "mlp.up_proj.weight", b + "ffn_up.weight", (F, H), ROLE_MATRIX),
            p.take(L + "mlp.down_proj.weight", b + "ffn_down.weight", (H, F), ROLE_MATRIX),
        ]
    out.append(p.take("text.norm.weight", "output_norm.weight", (H,), ROLE_VECTOR))
    if p.has("lm_head.weight"):
        out.append(p.take("lm_head.weight", "output.weight", (n_vocab, H), ROLE_MATRIX))
    elif t.tie_embeddings:
        tied = p.take("text.embed_tokens.weight", "output.weight", (n_vocab, H), ROLE_MATRIX)
        out.append(tied)
    else:
        raise ConversionError(f"{p.where}: missing tensor 'lm_head.weight' and tie_word_embeddings is false")
    return out


def plan_vision(p: _Planner, v: VisionHParams, n_layers: int, swap_ffn: bool = False,
                post_ln: bool = True) -> List[PlannedTensor]:
    """CLIP tower tensors for the first n_layers layers.

    swap_ffn: store fc1 as ffn_down and fc2 as ffn_up, as llama.cpp's legacy converter does.
    """
    H, F, P = v.hidden, v.ff, v.patch_size
    out = [
        p.take("vision.embeddings.class_embedding", "v.class_embd", (H,), ROLE_VECTOR),
        p.take("vision.embeddings.patch_embedding.weight", "v.patch_embd.weight", (H, 3, P, P), ROLE_EMBED),
        p.take("vision.embeddings.position_embedding.weight", "v.position_embd.weight", (v.n_positions, H),
               ROLE_EMBED),
        p.take("vision.pre_layrnorm.weight", "v.pre_ln.weight", (H,), ROLE_VECTOR),
        p.take("vision.pre_layrnorm.bias", "v.pre_ln.bias", (H,), ROLE_VECTOR),
    ]
    up, down = ("ffn_down", "ffn_up") if swap_ffn else ("ffn_up", "ffn_down")
    for i in range(n_layers):
        L = f"vision.encoder.layers.{i}."
        b = f"v.blk.{i}."
        for hf_norm, g in (("layer_norm1", "ln1"), ("layer_norm2", "ln2")):
            for kind in ("weight", "bias"):
                out.append(p.take(L + f"{hf_norm}.{kind}", b + f"{g}.{kind}", (H,), ROLE_VECTOR))
        for hf_proj, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("out_proj", "attn_out")):
            out.append(p.take(L + f"self_attn.{hf_proj}.weight", b + f"{g}.weight", (H, H), ROLE_MATRIX))
            out.append(p.take(L + f"self_attn.{hf_proj}.bias", b + f"{g}.bias", (H,), ROLE_VECTOR))
        out += [
            p.take(L + "mlp.fc1.weight", b + f"{up}.weight", (F, H), ROLE_MATRIX),
            p.take(L + "mlp.fc1.bias", b + f"{up}.bias", (F,), ROLE_VECTOR),
            p.take(L + "mlp.fc2.weight", b + f"{down}.weight", (H, F), ROLE_MATRIX),
            p.take(L + "mlp.fc2.bias", b + f"{down}.bias", (H,), ROLE_VECTOR),
        ]
    if post_ln:
        out += [p.take("vision.post_layernorm.weight", "v.post_ln.weight", (H,), ROLE_VECTOR),
                p.take("vision.post_layernorm.bias", "v.post_ln.bias", (H,), ROLE_VECTOR)]
    return out


def plan_projector(p: _Planner, hp: LlavaHParams) -> List[PlannedTensor]:
    T, V = hp.text.hidden, hp.vision.hidden
    out = [p.take("projector.linear_1.weight", "mm.0.weight", (T, V), ROLE_MATRIX)]
    out.append(p.take("projector.linear_1.bias", "mm.0.bias", (T,), ROLE_VECTOR) if hp.projector_bias
               else p.zeros("mm.0.bias", (T,)))
    out.append(p.take("projector.linear_2.weight", "mm.2.weight", (T, T), ROLE_MATRIX))
    out.append(p.take("projector.linear_2.bias", "mm.2.bias", (T,), ROLE_VECTOR) if hp.projector_bias
               else p.zeros("mm.2.bias", (T,)))
    return out


# ------------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------------


def add_text_kv(w, hp: LlavaHParams, vocab: Vocab, outtype: str) -> None:
    t = hp.text
    w.add_name(hp.name)
    w.add_file_type(file_type_for(outtype))
    if outtype == "q8_0":
        w.add_quantization_version(2)  # ggml's GGML_QNT_VERSION
    w.add_uint32("llama.context_length", t.ctx)
    w.add_uint32("llama.embedding_length", t.hidden)
    w.add_uint32("llama.block_count", t.n_layers)
    w.add_uint32("llama.feed_forward_length", t.ff)
    w.add_uint32("llama.attention.head_count", t.n_heads)
    w.add_uint32("llama.attention.head_count_kv", t.n_kv_heads)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", t.rms_eps)
    w.add_float32("llama.rope.freq_base", t.rope_theta)
    w.add_uint32("llama.rope.dimension_count", t.head_dim)
    if t.head_dim * t.n_heads != t.hidden:
        w.add_uint32("llama.attention.key_length", t.head_dim)
        w.add_uint32("llama.attention.value_length", t.head_dim)
    w.add_uint32("llama.vocab_size", len(vocab))
    vocab.add_to_gguf(w)


def add_clip_kv(w, hp: LlavaHParams, block_count: int, image: dict, projection_dim: int) -> None:
    v = hp.vision
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.hidden)
    w.add_uint32("clip.vision.feed_forward_length", v.ff)
    w.add_uint32("clip.vision.projection_dim", projection_dim)
    w.add_uint32("clip.vision.block_count", block_count)
    w.add_uint32("clip.vision.attention.head_count", v.n_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v.ln_eps)
    w.add_array("clip.vision.image_mean", image["image_mean"])
    w.add_array("clip.vision.image_std", image["image_std"])
    w.add_bool("clip.use_gelu", v.act == "gelu")


def add_vtrim_kv(w, hp: LlavaHParams, image: dict) -> None:
    w.add_string("vtrim.layout", "single")
    w.add_int32("vtrim.vision.feature_layer", hp.feature_layer)
    w.add_string("vtrim.vision.feature_select", hp.feature_select)
    w.add_string("vtrim.projector.act", hp.projector_act)
    w.add_uint32("vtrim.image_token_id", hp.image_token_id)
    w.add_string("vtrim.chat_format", "llava-1.5")
    w.add_bool("vtrim.image.do_resize", image["do_resize"])
    w.add_uint32("vtrim.image.shortest_edge", image["shortest_edge"])
    w.add_uint32("vtrim.image.resample", image["resample"])
    w.add_bool("vtrim.image.do_center_crop", image["do_center_crop"])
    w.add_uint32("vtrim.image.crop_height", image["crop_height"])
    w.add_uint32("vtrim.image.crop_width", image["crop_width"])
    w.add_bool("vtrim.image.do_rescale", image["do_rescale"])
    w.add_float32("vtrim.image.rescale_factor", image["rescale_factor"])
    w.add_bool("vtrim.image.do_normalize", image["do_normalize"])
    w.add_bool("vtrim.image.do_pad", image["do_pad"])
    w.add_bool("vtrim.image.do_convert_rgb", image["do_convert_rgb"])


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def embedding_rows(src: TensorSource, names: Dict[str, str], where: str) -> int:
    hf = names.get("text.embed_tokens.weight")
    if hf is None:
        raise ConversionError(f"{where}: missing tensor 'embed_tokens.weight' (the text embedding)")
    return int(src.shape(hf)[0])


def write_llava(out_path, hp: LlavaHParams, src: TensorSource, vocab: Vocab, image: dict, outtype: str,
                layout: str = "single", progress: Optional[Progress] = None, where: str = "model") -> List[Path]:
    """Write the GGUF file(s); returns their paths (text file first)."""
    names = canonical_names(src.names(), where)
    n_vocab = embedding_rows(src, names, where)
    if n_vocab != hp.text.vocab_size:
        raise ConversionError(f"{where}: embed_tokens has {n_vocab} rows but text_config.vocab_size is "
                              f"{hp.text.vocab_size}")
    vocab.fit_to(n_vocab, where)
    if hp.image_token_id >= n_vocab:
        raise ConversionError(f"{where}: image token id {hp.image_token_id} is outside the vocabulary")
    out_path = Path(out_path)
    if layout == "llama.cpp":
        from .llamacpp_layout import write_llamacpp_pair

        return write_llamacpp_pair(out_path, hp, src, names, vocab, image, outtype, progress, where)
    if layout != "single":
        raise ConversionError(f"unknown layout {layout!r} (choose 'single' or 'llama.cpp')")

    p = _Planner(src, names, where)
    tensors = plan_text(p, hp.text, n_vocab)
    tensors += plan_vision(p, hp.vision, hp.vision.n_layers)
    tensors += plan_projector(p, hp)
    p.check_all_used()

    def add_kv(w):
        add_text_kv(w, hp, vocab, outtype)
        add_clip_kv(w, hp, hp.vision.n_layers, image, projection_dim=hp.text.hidden)
        add_vtrim_kv(w, hp, image)

    return [write_gguf(out_path, "llama", add_kv, tensors, outtype, progress)]


def convert_llava_dir(hf_dir, out_path, outtype: str = "f16", layout: str = "single",
                      progress: Optional[Progress] = None) -> List[Path]:
    from .tensors import SafetensorsSource
    from .vocab import load_hf_vocab

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a directory")
    cfg = read_json(hf_dir / "config.json")
    hp = parse_llava_config(cfg, str(hf_dir / "config.json"), name=cfg.get("_name_or_path") or hf_dir.name)
    image = image_params(read_json(hf_dir / "preprocessor_config.json", required=False), hp.vision,
                         str(hf_dir / "preprocessor_config.json"))
    src = SafetensorsSource(hf_dir)
    try:
        names = canonical_names(src.names(), str(hf_dir))
        n_vocab = embedding_rows(src, names, str(hf_dir))
        text_cfg = dict(cfg.get("text_config") or {})
        vocab = load_hf_vocab(hf_dir, n_vocab, text_cfg)
        return write_llava(out_path, hp, src, vocab, image, outtype, layout, progress, where=str(hf_dir))
    finally:
        src.close()
