"""Tiny random-weight Llama-3.2-Vision ("mllama") models and their Llama-3 tokenizer, built offline.

  * The tokenizer: the real Llama-3 vocabulary and merges from the pinned llama.cpp archive's
    ``models/ggml-vocab-llama-bpe.gguf``, rebuilt as a HF ``tokenizer.json`` (byte-level BPE, Llama-3's
    split regex, ``ignore_merges`` as Llama-3 has it). The archive's file is the Llama-3.0 vocabulary;
    Llama-3.1/3.2 renamed some reserved specials (128004 <|finetune_right_pad_id|>, 128008 <|eom_id|>,
    128010 <|python_tag|>, the rest renumbered), which we apply, and Llama-3.2-Vision adds
    <|image|> at 128256. The text model's vocab_size is 128256 (lm_head rows) and its embedding has
    vocab_size + 8 rows, as in the real checkpoints.
  * The weights: random from a fixed torch seed, saved with transformers' ``save_pretrained``.

Weight scale: transformers initialises every mllama weight with N(0, text_config.initializer_range); we
use 0.2 (as the LLaVA fixtures do) for a logit std of order 1 (measured in tests/test_fixtures_mllama.py).
transformers initialises the cross-attention gates and the tile-embedding gates to 0 (tanh(0) = 0 switches
those paths off) and the global layers' gates to N(0, std); we give every gate a random value of
magnitude 0.3-1.2 so each path changes the output, and norms / biases random values around 1 / 0.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import fixtures

try:  # the converter, from the installed package or this source checkout
    import pyvtrim.conversion  # noqa: F401
except ImportError:
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from pyvtrim.conversion.mllama import MLLAMA_CHAT_TEMPLATE  # noqa: E402
from pyvtrim.conversion.vocab_bpe import LLAMA3_SPLIT_REGEX, llama31_special_token  # noqa: E402

FIXTURE_VERSION = 1  # bump when make_tiny_mllama changes what it builds (invalidates the caches)

TEXT_VOCAB = 128256            # text_config.vocab_size: lm_head rows, tokens incl. the 256 specials
EMBED_ROWS = TEXT_VOCAB + 8    # MllamaTextModel's embed_tokens has vocab_size + 8 rows
IMAGE_TOKEN = "<|image|>"
IMAGE_TOKEN_ID = 128256
BOS_TOKEN, BOS_ID = "<|begin_of_text|>", 128000
EOT_TOKEN, EOT_ID = "<|eot_id|>", 128009
EOM_ID = 128008
PAD_TOKEN, PAD_ID = "<|finetune_right_pad_id|>", 128004
START_HEADER_ID, END_HEADER_ID = 128006, 128007
N_BASE_TOKENS = 128000         # byte-level BPE pieces; 128000.. are the special tokens

# CLIP's (OpenAI) normalisation, as Llama-3.2-Vision's preprocessor_config.json has it.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PIL_BILINEAR = 2


# ---------------------------------------------------------------------------------------------
# A fast GGUF reader (gguf.GGUFReader needs ~15 s for a Llama-3 vocabulary: it makes numpy views of
# every string; this reads the same header in ~1 s)
# ---------------------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


class GgufFile:
    """Keys (Python values; arrays as lists), tensor infos and data of a GGUF file.

    kv_types[key] is (value type, element type or None), with gguf's GGUFValueType numbers."""

    def __init__(self, path):
        import struct

        self.path = Path(path)
        buf = self.path.read_bytes()
        self._buf = buf
        pos = 0

        def take(fmt):
            nonlocal pos
            v = struct.unpack_from(fmt, buf, pos)[0]
            pos += struct.calcsize(fmt)
            return v

        def string():
            nonlocal pos
            n = take("<Q")
            v = buf[pos:pos + n].decode("utf-8")
            pos += n
            return v

        def value(t):
            return string() if t == GGUF_STRING else take(_SCALARS[t])

        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        pos = 4
        self.version = take("<I")
        n_tensors, n_kv = take("<Q"), take("<Q")
        self.kv, self.kv_types = {}, {}
        for _ in range(n_kv):
            key = string()
            t = take("<I")
            if t == GGUF_ARRAY:
                et, n = take("<I"), take("<Q")
                self.kv[key] = [value(et) for _ in range(n)]
                self.kv_types[key] = (t, et)
            else:
                self.kv[key] = value(t)
                self.kv_types[key] = (t, None)
        self.tensor_info = {}
        for _ in range(n_tensors):
            name = string()
            nd = take("<I")
            ne = tuple(take("<Q") for _ in range(nd))
            self.tensor_info[name] = (ne, take("<I"), take("<Q"))  # ggml ne, ggml type, offset
        align = int(self.kv.get("general.alignment", 32))
        self.data_start = (pos + align - 1) // align * align

    def tensor_names(self) -> list:
        return list(self.tensor_info)

    def shape(self, name) -> tuple:  # numpy order (ggml's ne reversed)
        return tuple(int(x) for x in reversed(self.tensor_info[name][0]))

    def type(self, name):
        import gguf

        return gguf.GGMLQuantizationType(self.tensor_info[name][1])

    def f32(self, name):
        import gguf
        import numpy as np

        ne, t, off = self.tensor_info[name]
        shape = self.shape(name)
        qt = gguf.GGMLQuantizationType(t)
        block, nbytes = gguf.GGML_QUANT_SIZES[qt]
        n = int(np.prod(shape))
        raw = np.frombuffer(self._buf, np.uint8, n // block * nbytes, self.data_start + off)
        if qt == gguf.GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(shape).copy()
        if qt == gguf.GGMLQuantizationType.F16:
            return raw.view(np.float16).astype(np.float32).reshape(shape)
        rows = raw.reshape(-1, shape[-1] // block * nbytes)
        return np.asarray(gguf.quants.dequantize(rows, qt), np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------
# The Llama-3 tokenizer
# ---------------------------------------------------------------------------------------------


def build_llama3_tokenizer_json(vocab_gguf_path, out_path) -> Path:
    """Write a HF tokenizer.json equal in behaviour to Llama-3.2-Vision's (incl. <|image|>)."""
    kv = GgufFile(vocab_gguf_path).kv
    tokens, types, merges = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.merges"]
    assert len(tokens) == TEXT_VOCAB, len(tokens)
    assert all(t == 1 for t in types[:N_BASE_TOKENS]) and all(t == 3 for t in types[N_BASE_TOKENS:])

    def added(tid, text):
        return {"id": tid, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    specials = [added(tid, llama31_special_token(tid)) for tid in range(N_BASE_TOKENS, TEXT_VOCAB)]
    specials.append(added(IMAGE_TOKEN_ID, IMAGE_TOKEN))
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": BOS_TOKEN, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [BOS_ID], "tokens": [BOS_TOKEN]}}},
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {t: i for i, t in enumerate(tokens[:N_BASE_TOKENS])},
                  "merges": [m.split(" ") for m in merges]},
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    return out_path


def llama3_tokenizer_json() -> Path:
    """The rebuilt Llama-3.2-Vision tokenizer.json, cached."""
    src = fixtures.vocab_path("ggml-vocab-llama-bpe.gguf")
    out = fixtures.cache_root() / "fixtures" / f"llama3-bpe-v{FIXTURE_VERSION}" / "tokenizer.json"
    if not out.is_file():
        tmp = out.with_name(f"tokenizer.json.tmp{os.getpid()}")
        build_llama3_tokenizer_json(src, tmp)
        os.replace(tmp, out)
    return out


def tokenizer_config() -> dict:
    """tokenizer_config.json as Llama-3.2-11B-Vision-Instruct has it (less the added_tokens_decoder list,
    which tokenizer.json's added_tokens gives)."""
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOT_TOKEN,
        "pad_token": PAD_TOKEN,
        "chat_template": MLLAMA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "processor_class": "MllamaProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def save_tokenizer(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    shutil.copyfile(llama3_tokenizer_json(), out_dir / "tokenizer.json")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS_TOKEN, "eos_token": EOT_TOKEN, "pad_token": PAD_TOKEN}, indent=2))
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": MLLAMA_CHAT_TEMPLATE}))


def encode(tokenizer_json: Path, text: str, add_bos: bool = False) -> list:
    """Token ids with the `tokenizers` library (special tokens in `text` are recognised)."""
    tok = _tokenizer(str(tokenizer_json))
    return tok.encode(text, add_special_tokens=add_bos).ids


_TOKENIZERS = {}


def _tokenizer(path: str):
    from tokenizers import Tokenizer

    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = Tokenizer.from_file(path)
    return _TOKENIZERS[path]


def prompt_ids(tokenizer_json: Path, question: str, n_images: int = 1, image_first: bool = True) -> list:
    """The Llama-3.2-Vision chat prompt for one user turn, as token ids:
    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|>{question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n (images after the question when not image_first)."""
    images = IMAGE_TOKEN * n_images
    body = images + question if image_first else question + images
    text = (f"{BOS_TOKEN}<|start_header_id|>user<|end_header_id|>\n\n{body}{EOT_TOKEN}"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n")
    return encode(tokenizer_json, text, add_bos=False)


# ---------------------------------------------------------------------------------------------
# Tiny mllama
# ---------------------------------------------------------------------------------------------


def supported_aspect_ratios(max_tiles: int) -> list:
    """[[h, w], ...] in the order transformers' MllamaImageProcessor derives them from max_image_tiles."""
    return [[a, b] for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def tiny_mllama_params(**overrides) -> dict:
    p = dict(
        seed=0,
        text_hidden=64,
        text_ff=160,
        n_layers=5,
        cross_layers=[1, 3],
        n_heads=4,
        n_kv_heads=2,
        rope_theta=500000.0,
        # Llama-3.1 RoPE scaling; with head_dim 16 and an original context of 256 the 8 frequencies
        # fall in all three bands (unscaled, smoothed, scaled by `factor`).
        rope_llama3=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256),
        rms_eps=1e-5,
        max_pos=1024,
        init=0.2,
        vision_hidden=32,
        vision_ff=80,
        vision_layers=3,
        vision_global_layers=2,
        vision_heads=4,
        intermediate_layers=[0, 2],
        image_size=28,
        patch_size=14,
        max_tiles=4,
    )
    unknown = set(overrides) - set(p)
    if unknown:
        raise TypeError(f"unknown tiny-mllama parameters: {sorted(unknown)}")
    p.update(overrides)
    return p


# The second shape (fixture mllama_tiny_b): other widths, GQA 6/3, consecutive cross layers with the last
# layer a cross layer, plain RoPE, 56px tiles (17 positions, padded to 24), one global layer.
TINY_B = dict(seed=1, text_hidden=96, text_ff=192, n_layers=4, cross_layers=[2, 3], n_heads=6, n_kv_heads=3,
              rope_theta=10000.0, rope_llama3=None, vision_hidden=48, vision_ff=96, vision_layers=4,
              vision_global_layers=1, vision_heads=4, intermediate_layers=[1, 3], image_size=56)


def mllama_config(p: dict):
    from transformers import MllamaConfig

    rope = dict(rope_type="default", rope_theta=p["rope_theta"])
    if p["rope_llama3"]:
        rope = dict(p["rope_llama3"], rope_type="llama3", rope_theta=p["rope_theta"])
    text = dict(
        vocab_size=TEXT_VOCAB, hidden_size=p["text_hidden"], intermediate_size=p["text_ff"],
        num_hidden_layers=p["n_layers"], cross_attention_layers=list(p["cross_layers"]),
        num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"], rope_parameters=rope,
        rms_norm_eps=p["rms_eps"], max_position_embeddings=p["max_pos"], initializer_range=p["init"],
        bos_token_id=BOS_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    vision = dict(
        hidden_size=p["vision_hidden"], intermediate_size=p["vision_ff"], num_hidden_layers=p["vision_layers"],
        num_global_layers=p["vision_global_layers"], attention_heads=p["vision_heads"],
        image_size=p["image_size"], patch_size=p["patch_size"], max_num_tiles=p["max_tiles"],
        intermediate_layers_indices=list(p["intermediate_layers"]),
        vision_output_dim=p["vision_hidden"] * (1 + len(p["intermediate_layers"])),
        supported_aspect_ratios=supported_aspect_ratios(p["max_tiles"]), initializer_range=p["init"],
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID)


def _randomize(model, seed: int) -> None:
    """Non-trivial norms, biases, gates and embeddings (see the module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "gate" in leaf and t.numel() == 1:  # cross_attn_*_gate, gate_attn/ffn, tile/position gates
                mag = 0.3 + 0.9 * torch.rand(1, generator=g)
                sign = 1.0 if torch.rand(1, generator=g).item() < 0.5 else -1.0
                t.copy_(sign * mag)
            elif "norm" in name and leaf == "weight":
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
            elif leaf == "bias":
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif "class_embedding" in name or "positional_embedding" in name:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))


def _save_preprocessor(out_dir: Path, p: dict) -> None:
    size = p["image_size"]
    cfg = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "MllamaImageProcessor",
        "image_std": CLIP_STD,
        "max_image_tiles": p["max_tiles"],
        "processor_class": "MllamaProcessor",
        "resample": PIL_BILINEAR,
        "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size},
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def make_tiny_mllama(out_dir, **params) -> Path:
    """Build and save a random-weight MllamaForConditionalGeneration; return its directory."""
    import torch
    from transformers import MllamaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    p = tiny_mllama_params(**params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = mllama_config(p)
    torch.manual_seed(p["seed"])
    model = MllamaForConditionalGeneration(cfg).eval()
    _randomize(model, p["seed"])
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # config warnings
    hf_logging.disable_progress_bar()  # "Writing model shards"
    try:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    save_tokenizer(out_dir)
    _save_preprocessor(out_dir, p)
    (out_dir / "tiny_params.json").write_text(json.dumps(p, indent=2, sort_keys=True))
    return out_dir


def cached_tiny_mllama(root, key: str = None, **params) -> Path:
    """make_tiny_mllama into ``root/mllama-tiny-<key>``; reuse it when already built."""
    p = tiny_mllama_params(**params)
    d = Path(root) / f"mllama-tiny-{key or fixtures.params_key(dict(p, _fixture=FIXTURE_VERSION))}"
    if (d / "tiny_params.json").is_file():
        return d
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_mllama(tmp, **p)
    try:
        os.replace(tmp, d)
    except OSError:  # another process finished the same model first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (d / "tiny_params.json").is_file():
            raise
    return d
