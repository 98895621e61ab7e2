"""Tiny random-weight models and tokenizers that the tests build themselves.

No weights can be downloaded here, so every model the tests use is made from:
  * the real Llama-2 vocabulary, rebuilt as a SentencePiece ``tokenizer.model`` from the pinned
    llama.cpp archive's ``models/ggml-vocab-llama-spm.gguf`` (tokens, scores, types);
  * random weights from a fixed torch seed, saved with transformers' ``save_pretrained``.

Weight scale: transformers initialises Linear/Embedding weights with N(0, initializer_range).
With the default 0.02 the tiny model's logits have a std of ~0.16 and a median top-1/top-2 gap
of ~0.017, so greedy choices are near-ties and parity tests would compare noise. We use
``initializer_range=0.2`` for both towers: logit std ~1.7, median gap ~0.28 (measured on
llava_tiny; tests/test_fixtures.py checks the std stays of order 1). Norm weights and biases
are randomised too (see _randomize_norms), so a converter that drops or swaps them fails parity.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
PADDED_VOCAB = 32064  # llava-hf pads the embedding to a multiple of 64
FIXTURE_VERSION = 1  # bump when make_tiny_llava changes what it builds (invalidates the caches)

try:  # the converter, from the installed package or this source checkout
    import pyvtrim.conversion  # noqa: F401
except ImportError:
    sys.path.append(str(Path(__file__).resolve().parents[2]))

# The LLaVA-1.5 chat template llava-hf ships (one copy, in the converter).
from pyvtrim.conversion.llava import LLAVA_CHAT_TEMPLATE  # noqa: E402

# CLIP's (OpenAI) normalisation constants, as CLIPImageProcessor defaults them.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def cache_root() -> Path:
    return Path(os.environ.get("VTRIM_CACHE_DIR") or Path.home() / ".cache" / "pyvtrim")


def vocab_path(name: str) -> Path:
    """Path of one of the archive's vocab GGUFs (e.g. "ggml-vocab-llama-spm.gguf")."""
    try:
        import pyvtrim

        p = Path(pyvtrim.data_path(name))
        if p.is_file():
            return p
    except Exception:  # package not installed yet, or no data_path
        pass
    p = cache_root() / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "models" / name
    if not p.is_file():
        raise FileNotFoundError(f"{name}: not found via pyvtrim.data_path nor at {p}")
    return p


def read_vocab_tests(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """The (text, token ids) pairs of the .inp/.out files next to a vocab GGUF."""
    sep = "\n__ggml_vocab_test__\n"
    inp = Path(str(gguf_path) + ".inp").read_text(encoding="utf-8")
    out = Path(str(gguf_path) + ".out").read_text(encoding="utf-8")
    texts = inp.split(sep)
    ids = out.split("\n")
    # .inp ends with a separator line; .out has one line per case.
    if texts and texts[-1].strip("\n") == "":
        texts = texts[:-1]
    if ids and ids[-1] == "":
        ids = ids[:-1]
    assert len(texts) == len(ids), (len(texts), len(ids))
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]


def build_spm_tokenizer_model(vocab_gguf_path, out_path) -> Path:
    """Write a SentencePiece BPE ``tokenizer.model`` equal in behaviour to Llama-2's."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    r = gguf.GGUFReader(str(vocab_gguf_path))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()

    m = pb.ModelProto()
    for text, score, ttype in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece = text
        p.score = float(score)
        p.type = int(ttype)  # GGUF token types use SentencePiece's numbering
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.unk_id = int(r.fields["tokenizer.ggml.unknown_token_id"].contents())
    ts.bos_id = int(r.fields["tokenizer.ggml.bos_token_id"].contents())
    ts.eos_id = int(r.fields["tokenizer.ggml.eos_token_id"].contents())
    ts.pad_id = -1
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(m.SerializeToString())
    return out_path


def spm_tokenizer_model() -> Path:
    """The rebuilt Llama-2 tokenizer.model, cached."""
    src = vocab_path("ggml-vocab-llama-spm.gguf")
    out = cache_root() / "fixtures" / "llama-spm" / "tokenizer.model"
    if not out.is_file():
        tmp = out.with_name(f"tokenizer.model.tmp{os.getpid()}")
        build_spm_tokenizer_model(src, tmp)
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# Tiny LLaVA
# ---------------------------------------------------------------------------------------------


def tiny_llava_params(**overrides) -> dict:
    p = dict(
        seed=0,
        text_hidden=64,
        text_ff=160,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        rope_theta=10000.0,
        rms_eps=1e-5,
        max_pos=512,
        text_init=0.2,
        tie_word_embeddings=False,
        vision_hidden=32,
        vision_ff=80,
        vision_layers=3,
        vision_heads=4,
        vision_act="quick_gelu",
        vision_init=0.2,
        image_size=30,
        patch_size=6,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_act="gelu",
        do_pad=False,
    )
    unknown = set(overrides) - set(p)
    if unknown:
        raise TypeError(f"unknown tiny-llava parameters: {sorted(unknown)}")
    p.update(overrides)
    return p


def params_key(p: dict) -> str:
    blob = json.dumps(p, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _save_tokenizer(out_dir: Path, spm_path: Path) -> None:
    """Save a llava-hf-like tokenizer: tokenizer.model + added <image>/<pad> + chat template."""
    shutil.copyfile(spm_path, out_dir / "tokenizer.model")
    from transformers import AddedToken, LlamaTokenizer

    # add_bos_token: transformers 5 builds the Llama tokenizer without BOS unless asked; llava-hf adds it.
    tok = LlamaTokenizer.from_pretrained(str(out_dir), legacy=False, add_bos_token=True)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    assert tok.convert_tokens_to_ids(PAD_TOKEN) == PAD_TOKEN_ID
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    if not (out_dir / "tokenizer.model").is_file():
        shutil.copyfile(spm_path, out_dir / "tokenizer.model")


def _save_preprocessor(out_dir: Path, p: dict) -> None:
    size = p["image_size"]
    cfg = {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": bool(p["do_pad"]),
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "LlavaImageProcessor" if p["do_pad"] else "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
    n_patches = (size // p["patch_size"]) ** 2
    proc = {
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 1,
        "patch_size": p["patch_size"],
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": p["vision_feature_select_strategy"],
    }
    (out_dir / "processor_config.json").write_text(json.dumps(proc, indent=2))
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_CHAT_TEMPLATE}))
    del n_patches


def make_tiny_llava(out_dir, **params) -> Path:
    """Build and save a random-weight LlavaForConditionalGeneration; return its directory.

    The parameters are those of ``tiny_llava_params``. The model has the real Llama-2 vocabulary
    (32000 pieces) plus "<image>" (32000) and "<pad>" (32001), embedding padded to 32064 rows.
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    p = tiny_llava_params(**params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tc = LlamaConfig(
        hidden_size=p["text_hidden"],
        intermediate_size=p["text_ff"],
        num_hidden_layers=p["n_layers"],
        num_attention_heads=p["n_heads"],
        num_key_value_heads=p["n_kv_heads"],
        rope_theta=p["rope_theta"],
        rms_norm_eps=p["rms_eps"],
        max_position_embeddings=p["max_pos"],
        vocab_size=PADDED_VOCAB,
        initializer_range=p["text_init"],
        tie_word_embeddings=p["tie_word_embeddings"],
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    vc = CLIPVisionConfig(
        hidden_size=p["vision_hidden"],
        intermediate_size=p["vision_ff"],
        num_hidden_layers=p["vision_layers"],
        num_attention_heads=p["vision_heads"],
        image_size=p["image_size"],
        patch_size=p["patch_size"],
        hidden_act=p["vision_act"],
        initializer_range=p["vision_init"],
        projection_dim=p["text_hidden"],
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=p["vision_feature_layer"],
        vision_feature_select_strategy=p["vision_feature_select_strategy"],
        projector_hidden_act=p["projector_act"],
        image_seq_length=(p["image_size"] // p["patch_size"]) ** 2,
        tie_word_embeddings=p["tie_word_embeddings"],
        pad_token_id=PAD_TOKEN_ID,
    )
    torch.manual_seed(p["seed"])
    model = LlavaForConditionalGeneration(cfg).eval()
    _randomize_norms(model, p["seed"])
    model.save_pretrained(str(out_dir), safe_serialization=True)
    _save_tokenizer(out_dir, spm_tokenizer_model())
    _save_preprocessor(out_dir, p)
    (out_dir / "tiny_params.json").write_text(json.dumps(p, indent=2, sort_keys=True))
    return out_dir


def _randomize_norms(model, seed: int) -> None:
    """Give norms, biases and CLIP's embeddings non-trivial values.

    transformers initialises norm weights to 1 and biases to 0; a converter that dropped or
    swapped them would then still pass parity. Random values around those defaults catch it.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.named_parameters():
            is_norm = "norm" in name or "layrnorm" in name
            if is_norm and name.endswith("weight"):
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif "class_embedding" in name or "position_embedding" in name:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))


def cached_tiny_llava(root, key: str = None, **params) -> Path:
    """make_tiny_llava into ``root/llava-tiny-<key>`` (default key: a hash of the parameters);
    reuse it when already built."""
    p = tiny_llava_params(**params)
    d = Path(root) / f"llava-tiny-{key or params_key(dict(p, _fixture=FIXTURE_VERSION))}"
    if (d / "tiny_params.json").is_file():
        return d
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_llava(tmp, **p)
    try:
        os.replace(tmp, d)
    except OSError:  # another process finished the same model first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (d / "tiny_params.json").is_file():
            raise
    return d
