"""llama.cpp's own two-file LLaVA-1.5 layout, for interoperability tests and users of its tools.

What llama.cpp's legacy path (llava_surgery_v2.py + convert_image_encoder_to_gguf.py + its HF
Llama converter) produces, written from the same planned tensors as the single layout:
  * OUT: the text model, arch "llama", with the tokenizer;
  * mmproj-OUT: arch "clip", the vision tower cut after the feature layer (block_count = n_layers - 1
    for vision_feature_layer -2), no post layernorm, CLIP's fc1 stored as ffn_down and fc2 as
    ffn_up, the conv kernel always f16, clip.vision.projection_dim = CLIP's projection_dim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from .base import ROLE_F16, ConversionError, Progress, file_type_for, write_gguf
from .llava import (LlavaHParams, _Planner, add_clip_kv, add_text_kv, plan_projector, plan_text, plan_vision)
from .tensors import TensorSource
from .vocab import Vocab


def mmproj_path(text_path: Path) -> Path:
    text_path = Path(text_path)
    return text_path.with_name("mmproj-" + text_path.name)


def legacy_block_count(hp: LlavaHParams, where: str) -> int:
    n, layer = hp.vision.n_layers, hp.feature_layer
    count = n + layer + 1 if layer < 0 else layer
    if count < 1:
        raise ConversionError(f"{where}: vision_feature_layer {layer} leaves no CLIP layer for llama.cpp's layout")
    return count


def write_llamacpp_pair(out_path: Path, hp: LlavaHParams, src: TensorSource, names: Dict[str, str], vocab: Vocab,
                        image: dict, outtype: str, progress: Optional[Progress], where: str) -> List[Path]:
    if hp.feature_select != "default":
        raise ConversionError(f"{where}: llama.cpp's LLaVA layout cannot express "
                              f"vision_feature_select_strategy {hp.feature_select!r}")
    if hp.projector_act != "gelu":
        raise ConversionError(f"{where}: llama.cpp's 'mlp' projector is GELU; {hp.projector_act!r} is unsupported")
    n_blocks = legacy_block_count(hp, where)
    n_vocab = len(vocab)

    p = _Planner(src, names, where)
    text = plan_text(p, hp.text, n_vocab)
    mm = plan_projector(p, hp)
    vision = plan_vision(p, hp.vision, n_blocks, swap_ffn=True, post_ln=False)
    for t in vision:
        if t.name == "v.patch_embd.weight":
            t.role = ROLE_F16
    skipped = {f"vision.encoder.layers.{i}.{rest}" for i in range(n_blocks, hp.vision.n_layers)
               for rest in _layer_tensor_suffixes()}
    p.check_all_used(allowed_unused=skipped | {"vision.post_layernorm.weight", "vision.post_layernorm.bias"})

    def add_text(w):
        add_text_kv(w, hp, vocab, outtype)

    def add_mmproj(w):
        w.add_bool("clip.has_text_encoder", False)
        w.add_file_type(file_type_for(outtype))
        w.add_name(hp.name)
        w.add_description("image encoder for LLaVA")
        add_clip_kv(w, hp, n_blocks, image, projection_dim=hp.vision.projection_dim)

    text_path = Path(out_path)
    proj_path = mmproj_path(text_path)
    total = len(text) + len(mm) + len(vision)

    def shifted(offset):
        if progress is None:
            return None
        return lambda i, n, name: progress(offset + i, total, name)

    write_gguf(text_path, "llama", add_text, text, outtype, shifted(0))
    write_gguf(proj_path, "clip", add_mmproj, mm + vision, outtype, shifted(len(text)))
    return [text_path, proj_path]


def _layer_tensor_suffixes():
    out = []
    for mod in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
        out += [f"{mod}.weight", f"{mod}.bias"]
    return out
