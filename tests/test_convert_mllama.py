"""The HF -> GGUF converter for Llama-3.2-Vision ("mllama"): keys, tensor names, shapes, types, values,
permutation, llama3 RoPE factors, vocabulary, cross-attention layer indices, HF name styles, errors,
and a numpy forward over the GGUF against transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("safetensors")

import fixtures_mllama as fm  # noqa: E402
from pyvtrim.conversion import ConversionError, convert  # noqa: E402
from pyvtrim.conversion.llava import unpermute_for_rope  # noqa: E402
from pyvtrim.conversion.mllama import MLLAMA_CHAT_TEMPLATE, parse_mllama_config, mllama_image_params  # noqa: E402

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
REPO = Path(__file__).resolve().parents[1]
_READ = {}


def read(path) -> fm.GgufFile:
    """The GGUF read back (fast reader, cached per session; test_gguf_reader_agrees checks it)."""
    path = Path(path)
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _READ:
        _READ[key] = fm.GgufFile(path)
    return _READ[key]


def hf_tensors(hf_dir):
    from safetensors.numpy import load_file

    return load_file(str(Path(hf_dir) / "model.safetensors"))


def copy_model(src, dst) -> Path:
    """A copy to edit; the weights are a symlink (rewrite_weights replaces the link, never the target)."""
    dst = Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("gguf-*", "model.safetensors"))
    (dst / "model.safetensors").symlink_to(Path(src).resolve() / "model.safetensors")
    return dst


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def rewrite_weights(d: Path, fn) -> None:
    from safetensors.numpy import save_file

    sd = fn(dict(hf_tensors(d)))
    (d / "model.safetensors").unlink()
    save_file(sd, str(d / "model.safetensors"))


# ------------------------------------------------------------------------------------------------
# expected layout, written from the GGUF spec (independently of the converter)
# ------------------------------------------------------------------------------------------------

VISION_LAYER = {  # GGUF suffix -> (HF suffix, shape given (H, F))
    "ln1.weight": ("input_layernorm.weight", lambda H, F: (H,)),
    "ln1.bias": ("input_layernorm.bias", lambda H, F: (H,)),
    "ln2.weight": ("post_attention_layernorm.weight", lambda H, F: (H,)),
    "ln2.bias": ("post_attention_layernorm.bias", lambda H, F: (H,)),
    "attn_q.weight": ("self_attn.q_proj.weight", lambda H, F: (H, H)),
    "attn_k.weight": ("self_attn.k_proj.weight", lambda H, F: (H, H)),
    "attn_v.weight": ("self_attn.v_proj.weight", lambda H, F: (H, H)),
    "attn_out.weight": ("self_attn.o_proj.weight", lambda H, F: (H, H)),
    "ffn_up.weight": ("mlp.fc1.weight", lambda H, F: (F, H)),
    "ffn_up.bias": ("mlp.fc1.bias", lambda H, F: (F,)),
    "ffn_down.weight": ("mlp.fc2.weight", lambda H, F: (H, F)),
    "ffn_down.bias": ("mlp.fc2.bias", lambda H, F: (H,)),
}


def expected(p: dict) -> dict:
    """GGUF name -> (HF 4.x checkpoint name or None, numpy shape)."""
    H, F, nh, nkv = p["text_hidden"], p["text_ff"], p["n_heads"], p["n_kv_heads"]
    D = H // nh
    out = {"token_embd.weight": ("language_model.model.embed_tokens.weight", (fm.EMBED_ROWS, H)),
           "output_norm.weight": ("language_model.model.norm.weight", (H,)),
           "output.weight": ("language_model.lm_head.weight", (fm.TEXT_VOCAB, H))}
    for i in range(p["n_layers"]):
        L, b = f"language_model.model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = (L + "input_layernorm.weight", (H,))
        out[b + "ffn_norm.weight"] = (L + "post_attention_layernorm.weight", (H,))
        out[b + "ffn_gate.weight"] = (L + "mlp.gate_proj.weight", (F, H))
        out[b + "ffn_up.weight"] = (L + "mlp.up_proj.weight", (F, H))
        out[b + "ffn_down.weight"] = (L + "mlp.down_proj.weight", (H, F))
        if i in p["cross_layers"]:
            A = L + "cross_attn."
            out.update({
                b + "cross_attn_q_proj.weight": (A + "q_proj.weight", (nh * D, H)),
                b + "cross_attn_k_proj.weight": (A + "k_proj.weight", (nkv * D, H)),
                b + "cross_attn_v_proj.weight": (A + "v_proj.weight", (nkv * D, H)),
                b + "cross_attn_o_proj.weight": (A + "o_proj.weight", (H, nh * D)),
                b + "cross_attn_q_norm.weight": (A + "q_norm.weight", (D,)),
                b + "cross_attn_k_norm.weight": (A + "k_norm.weight", (D,)),
                b + "cross_attn_attn_gate": (L + "cross_attn_attn_gate", (1,)),
                b + "cross_attn_mlp_gate": (L + "cross_attn_mlp_gate", (1,)),
            })
        else:
            A = L + "self_attn."
            out.update({
                b + "attn_q.weight": (A + "q_proj.weight", (nh * D, H)),
                b + "attn_k.weight": (A + "k_proj.weight", (nkv * D, H)),
                b + "attn_v.weight": (A + "v_proj.weight", (nkv * D, H)),
                b + "attn_output.weight": (A + "o_proj.weight", (H, nh * D)),
            })
    if p["rope_llama3"]:
        out["rope_freqs.weight"] = (None, (D // 2,))
    VH, VF, P, S, nt = p["vision_hidden"], p["vision_ff"], p["patch_size"], p["image_size"], p["max_tiles"]
    N = (S // P) ** 2 + 1
    R = len(fm.supported_aspect_ratios(nt)) + 1
    vm = "vision_model."
    out.update({
        "v.patch_embd.weight": (vm + "patch_embedding.weight", (VH, 3, P, P)),
        "v.class_embd": (vm + "class_embedding", (VH,)),
        "v.position_embd.weight": (vm + "gated_positional_embedding.embedding", (N, VH)),
        "v.position_embd.gate": (vm + "gated_positional_embedding.gate", (1,)),
        "v.tile_position_embd.weight": (vm + "gated_positional_embedding.tile_embedding.weight", (R, nt * N * VH)),
        "v.pre_tile_position_embd.weight": (vm + "pre_tile_positional_embedding.embedding.weight", (R, nt * VH)),
        "v.pre_tile_position_embd.gate": (vm + "pre_tile_positional_embedding.gate", (1,)),
        "v.post_tile_position_embd.weight": (vm + "post_tile_positional_embedding.embedding.weight", (R, nt * VH)),
        "v.post_tile_position_embd.gate": (vm + "post_tile_positional_embedding.gate", (1,)),
        "v.pre_ln.weight": (vm + "layernorm_pre.weight", (VH,)),
        "v.pre_ln.bias": (vm + "layernorm_pre.bias", (VH,)),
        "v.post_ln.weight": (vm + "layernorm_post.weight", (VH,)),
        "v.post_ln.bias": (vm + "layernorm_post.bias", (VH,)),
        "mm.weight": ("multi_modal_projector.weight", (H, VH * (1 + len(p["intermediate_layers"])))),
        "mm.bias": ("multi_modal_projector.bias", (H,)),
    })
    for n_layers, hf, g, gated in ((p["vision_layers"], "transformer", "v.blk", False),
                                   (p["vision_global_layers"], "global_transformer", "v.global.blk", True)):
        for i in range(n_layers):
            for suffix, (hf_suffix, shape) in VISION_LAYER.items():
                out[f"{g}.{i}.{suffix}"] = (f"{vm}{hf}.layers.{i}.{hf_suffix}", shape(VH, VF))
            if gated:
                out[f"{g}.{i}.gate_attn"] = (f"{vm}{hf}.layers.{i}.gate_attn", (1,))
                out[f"{g}.{i}.gate_ffn"] = (f"{vm}{hf}.layers.{i}.gate_ffn", (1,))
    return out


def expected_type(name: str, shape: tuple, outtype: str):
    if len(shape) == 1:                       # norms, biases, gates, class embedding, rope factors
        return T.F32
    if outtype == "f32":
        return T.F32
    if name in ("v.patch_embd.weight", "v.position_embd.weight") or "tile_position_embd" in name:
        return T.F16                          # embedding tables / conv kernel: never quantized
    if outtype == "f16" or shape[-1] % 32:
        return T.F16
    return T.Q8_0


# ------------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------------


def test_keys(mllama_tiny):
    g = read(mllama_tiny.gguf)
    kv, p = g.kv, mllama_tiny.params
    assert kv["general.architecture"] == "mllama" and kv["general.file_type"] == 0
    assert kv["general.name"]
    H = p["text_hidden"]
    want = {
        "mllama.context_length": p["max_pos"], "mllama.embedding_length": H, "mllama.block_count": p["n_layers"],
        "mllama.feed_forward_length": p["text_ff"], "mllama.attention.head_count": p["n_heads"],
        "mllama.attention.head_count_kv": p["n_kv_heads"], "mllama.rope.dimension_count": H // p["n_heads"],
        "mllama.vocab_size": fm.TEXT_VOCAB, "mllama.cross_attention_layers": [1, 3],
        "mllama.vision.image_size": 28, "mllama.vision.patch_size": 14, "mllama.vision.embedding_length": 32,
        "mllama.vision.feed_forward_length": 80, "mllama.vision.block_count": 3,
        "mllama.vision.global_block_count": 2, "mllama.vision.attention.head_count": 4,
        "mllama.vision.max_num_tiles": 4, "mllama.vision.intermediate_layers_indices": [0, 2],
        "mllama.vision.vision_output_dim": 96, "mllama.vision.num_channels": 3,
        "mllama.vision.supported_aspect_ratios": [1, 1, 1, 2, 1, 3, 1, 4, 2, 1, 2, 2, 3, 1, 4, 1],
        "vtrim.image_token_id": fm.IMAGE_TOKEN_ID, "vtrim.chat_format": "llama-3.2-vision",
        "vtrim.image.do_resize": True, "vtrim.image.resample": 2, "vtrim.image.do_rescale": True,
        "vtrim.image.do_normalize": True, "vtrim.image.do_pad": True, "vtrim.image.do_convert_rgb": True,
        "vtrim.image.max_image_tiles": 4,
    }
    for k, v in want.items():
        assert kv[k] == v, k
    assert kv["mllama.rope.freq_base"] == pytest.approx(500000.0)
    assert kv["mllama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert kv["mllama.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert kv["vtrim.image.rescale_factor"] == pytest.approx(1 / 255)
    np.testing.assert_allclose(kv["mllama.vision.image_mean"], fm.CLIP_MEAN, rtol=1e-6)
    np.testing.assert_allclose(kv["mllama.vision.image_std"], fm.CLIP_STD, rtol=1e-6)
    # value types the C loader reads
    for k in ("mllama.block_count", "mllama.vocab_size", "mllama.vision.max_num_tiles", "vtrim.image_token_id"):
        assert g.kv_types[k] == (V.UINT32, None), k
    for k in ("mllama.cross_attention_layers", "mllama.vision.intermediate_layers_indices",
              "mllama.vision.supported_aspect_ratios"):
        assert g.kv_types[k] == (V.ARRAY, V.INT32), k
    for k in ("mllama.vision.image_mean", "mllama.vision.image_std"):
        assert g.kv_types[k] == (V.ARRAY, V.FLOAT32), k


def test_keys_second_shape(mllama_tiny_b):
    kv, p = read(mllama_tiny_b.gguf).kv, mllama_tiny_b.params
    assert kv["mllama.cross_attention_layers"] == [2, 3] and kv["mllama.block_count"] == 4
    assert (kv["mllama.attention.head_count"], kv["mllama.attention.head_count_kv"]) == (6, 3)
    assert kv["mllama.rope.freq_base"] == pytest.approx(10000.0)
    assert (kv["mllama.vision.image_size"], kv["mllama.vision.block_count"], kv["mllama.vision.global_block_count"]) \
        == (56, 4, 1)
    assert kv["mllama.vision.intermediate_layers_indices"] == [1, 3]
    assert kv["mllama.vision.vision_output_dim"] == 3 * p["vision_hidden"]


# ------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mllama_tiny", "mllama_tiny_b"])
def test_tensor_names_and_shapes(request, name):
    fx = request.getfixturevalue(name)
    g = read(fx.gguf)
    want = expected(fx.params)
    assert set(g.tensor_names()) == set(want)
    for n, (_, shape) in want.items():
        assert g.shape(n) == shape, n
    cross = set(fx.params["cross_layers"])
    for i in range(fx.params["n_layers"]):
        assert (f"blk.{i}.cross_attn_q_proj.weight" in want) == (i in cross)
        assert (f"blk.{i}.attn_q.weight" in want) == (i not in cross)


@pytest.mark.parametrize("outtype,file_type", [("f32", 0), ("f16", 1), ("q8_0", 7)])
def test_types_per_outtype(mllama_tiny, outtype, file_type):
    g = read(mllama_tiny.gguf_path(outtype))
    assert g.kv["general.file_type"] == file_type
    for n in g.tensor_names():
        assert g.type(n) == expected_type(n, g.shape(n), outtype), n
    if outtype == "q8_0":
        assert g.kv["general.quantization_version"] == 2
        assert g.type("blk.0.attn_q.weight") == T.Q8_0 and g.type("v.blk.0.ffn_down.weight") == T.F16


@pytest.mark.parametrize("name", ["mllama_tiny", "mllama_tiny_b"])
@pytest.mark.parametrize("outtype,atol", [("f32", 0.0), ("f16", 2e-3)])
def test_values_match_hf(request, name, outtype, atol):
    """Every tensor is the HF tensor; self-attention Q/K rows permuted for ggml's RoPE, cross-attention not."""
    fx = request.getfixturevalue(name)
    p = fx.params
    g = read(fx.gguf_path(outtype))
    sd = hf_tensors(fx.hf_dir)
    for n, (hf, _) in expected(p).items():
        if hf is None:
            continue
        got = g.f32(n)
        if n.endswith("attn_q.weight") and n.startswith("blk."):
            got = unpermute_for_rope(got, p["n_heads"])
        elif n.endswith("attn_k.weight") and n.startswith("blk."):
            got = unpermute_for_rope(got, p["n_kv_heads"])
        want = sd[hf]
        np.testing.assert_allclose(got, want, rtol=atol and 1e-3, atol=atol * max(1.0, np.abs(want).max()),
                                   err_msg=n)


def test_only_self_attention_is_permuted(mllama_tiny):
    g, sd = read(mllama_tiny.gguf), hf_tensors(mllama_tiny.hf_dir)
    L = "language_model.model.layers."
    q0 = sd[L + "0.self_attn.q_proj.weight"]
    assert not np.array_equal(g.f32("blk.0.attn_q.weight"), q0)
    np.testing.assert_array_equal(g.f32("blk.0.attn_q.weight"),
                                  q0.reshape(4, 2, 8, -1).swapaxes(1, 2).reshape(q0.shape))
    np.testing.assert_array_equal(g.f32("blk.1.cross_attn_q_proj.weight"), sd[L + "1.cross_attn.q_proj.weight"])
    np.testing.assert_array_equal(g.f32("blk.1.cross_attn_k_proj.weight"), sd[L + "1.cross_attn.k_proj.weight"])


def test_rope_freqs_match_transformers(mllama_tiny, mllama_tiny_b):
    """theta_i / rope_freqs[i] is transformers' llama3 inverse frequency; absent without scaling."""
    pytest.importorskip("torch")
    from transformers import MllamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    g = read(mllama_tiny.gguf)
    factors = g.f32("rope_freqs.weight")
    cfg = MllamaConfig.from_pretrained(str(mllama_tiny.hf_dir)).text_config
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    d = g.kv["mllama.rope.dimension_count"]
    base_inv = 1.0 / (g.kv["mllama.rope.freq_base"] ** (np.arange(0, d, 2) / d))
    np.testing.assert_allclose(base_inv / factors, hf_inv.numpy(), rtol=1e-5)
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
    assert any(1.0 < f < 8.0 for f in factors)  # the fixture reaches the smoothed band too
    assert "rope_freqs.weight" not in read(mllama_tiny_b.gguf).tensor_names()


@pytest.mark.parametrize("name", ["mllama_tiny", "mllama_tiny_b"])
def test_numpy_forward_of_gguf_matches_transformers(request, name):
    """A numpy mllama forward over the f32 GGUF (ggml-style RoPE, GGUF names and keys only) gives
    transformers' logits: with two images after some text, and text only.

    Tolerance 1e-3 absolute on logits with a std of ~1.5: float32 (torch) against float64 (numpy);
    measured ~2e-5."""
    pytest.importorskip("torch")
    import gguf_reference_mllama as gr
    import mllama_reference as mr
    from gguf_reference import Weights

    fx = request.getfixturevalue(name)
    w = Weights(read(fx.gguf))
    model, proc = mr.load_model(fx.hf_dir), mr.load_image_processor(fx.hf_dir)
    S = fx.params["image_size"]
    imgs = [mr.test_image(2 * S - 3, S // 2, seed=1), mr.test_image(S, 3 * S + 1, seed=2)]
    ids = fm.prompt_ids(fx.tokenizer_json, "Compare: ", n_images=2, image_first=False)
    ref = mr.run_hf(model, ids, imgs, proc)
    inp = ref.inputs
    states = gr.cross_states(w, inp["pixel_values"][0].astype(np.float64), inp["aspect_ratio_ids"][0],
                             inp["num_tiles"][0])
    np.testing.assert_allclose(states, ref.cross_attention_states, rtol=0,
                               atol=1e-4 * np.abs(ref.cross_attention_states).max())
    got = gr.mllama_logits(w, ids, states, inp["cross_attention_mask"][0])
    assert ref.logits.std() > 0.5
    np.testing.assert_allclose(got, ref.logits, rtol=0, atol=1e-3)

    text = fm.prompt_ids(fx.tokenizer_json, "Hello there", n_images=0)
    np.testing.assert_allclose(gr.mllama_logits(w, text), mr.run_hf(model, text).logits, rtol=0, atol=1e-3)


def test_gguf_reader_agrees(mllama_tiny):
    """gguf-py's own reader (slow: ~15 s for the Llama-3 vocabulary) reads what the fast reader reads."""
    path = mllama_tiny.gguf_f16
    r = gguf.GGUFReader(str(path))
    fast = read(path)
    assert set(r.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"} == set(fast.kv)
    for k in ("general.architecture", "mllama.cross_attention_layers", "mllama.vision.supported_aspect_ratios",
              "tokenizer.ggml.pre", "tokenizer.ggml.eot_token_id", "vtrim.image_token_id"):
        assert r.fields[k].contents() == fast.kv[k], k
    assert r.fields["tokenizer.ggml.merges"].contents()[:100] == fast.kv["tokenizer.ggml.merges"][:100]
    assert [t.name for t in r.tensors] == fast.tensor_names()
    for t in r.tensors:
        assert tuple(int(x) for x in reversed(t.shape)) == fast.shape(t.name), t.name
        assert t.tensor_type == fast.type(t.name), t.name
    t = next(t for t in r.tensors if t.name == "mm.weight")
    np.testing.assert_array_equal(np.asarray(t.data, np.float32).reshape(fast.shape("mm.weight")),
                                  fast.f32("mm.weight"))


# ------------------------------------------------------------------------------------------------
# vocabulary
# ------------------------------------------------------------------------------------------------


def test_vocab(mllama_tiny, llama_bpe_vocab):
    kv = read(mllama_tiny.gguf).kv
    src = fm.GgufFile(llama_bpe_vocab).kv
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(tokens) == len(types) == fm.EMBED_ROWS
    assert tokens[:fm.N_BASE_TOKENS] == src["tokenizer.ggml.tokens"][:fm.N_BASE_TOKENS]
    assert set(types[:fm.N_BASE_TOKENS]) == {1}
    assert kv["tokenizer.ggml.merges"] == src["tokenizer.ggml.merges"]
    assert [fm.llama31_special_token(i) for i in range(fm.N_BASE_TOKENS, fm.TEXT_VOCAB)] == \
        tokens[fm.N_BASE_TOKENS:fm.TEXT_VOCAB]
    assert set(types[fm.N_BASE_TOKENS:fm.TEXT_VOCAB + 1]) == {3}              # CONTROL
    assert tokens[fm.IMAGE_TOKEN_ID] == "<|image|>"
    assert tokens[fm.TEXT_VOCAB + 1:] == [f"[PAD{i}]" for i in range(fm.TEXT_VOCAB + 1, fm.EMBED_ROWS)]
    assert set(types[fm.TEXT_VOCAB + 1:]) == {5}                                # UNUSED
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.padding_token_id"]) == (fm.BOS_ID, fm.EOT_ID, fm.PAD_ID)
    assert (kv["tokenizer.ggml.eot_token_id"], kv["tokenizer.ggml.eom_token_id"]) == (fm.EOT_ID, fm.EOM_ID)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.chat_template"] == MLLAMA_CHAT_TEMPLATE
    assert "scores" not in " ".join(kv)


def test_vocab_without_tokenizer_config(mllama_tiny, tmp_path):
    """tokenizer.json alone: BOS from its post-processor, eos/pad from config.json's ids."""
    d = copy_model(mllama_tiny.hf_dir, tmp_path / "m")
    for f in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.json"):
        (d / f).unlink()
    convert(d, tmp_path / "m.gguf", outtype="f16")
    kv = read(tmp_path / "m.gguf").kv
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.bos_token_id"] == fm.BOS_ID
    assert kv["tokenizer.ggml.eos_token_id"] == fm.EOT_ID and kv["tokenizer.ggml.padding_token_id"] == fm.PAD_ID
    assert "tokenizer.chat_template" not in kv


# ------------------------------------------------------------------------------------------------
# HF name styles, CLI
# ------------------------------------------------------------------------------------------------


def _to_transformers5(sd):
    out = {}
    for k, v in sd.items():
        for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_model.", "model.vision_model."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def test_transformers5_names(mllama_tiny, tmp_path):
    d = copy_model(mllama_tiny.hf_dir, tmp_path / "m")
    rewrite_weights(d, _to_transformers5)
    assert "lm_head.weight" in hf_tensors(d) and "model.language_model.norm.weight" in hf_tensors(d)
    convert(d, tmp_path / "m.gguf", outtype="f32")
    a, b = read(mllama_tiny.gguf), read(tmp_path / "m.gguf")
    assert a.tensor_names() == b.tensor_names()
    for n in a.tensor_names():
        np.testing.assert_array_equal(a.f32(n), b.f32(n), err_msg=n)


def test_cli(mllama_tiny, tmp_path):
    out = tmp_path / "cli.gguf"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_gguf.py"), str(mllama_tiny.hf_dir),
                        "--outfile", str(out), "--outtype", "q8_0", "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    kv = read(out).kv
    assert kv["general.architecture"] == "mllama" and kv["general.file_type"] == 7
    r = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_gguf.py"), str(mllama_tiny.hf_dir),
                        "--outfile", str(tmp_path / "x.gguf"), "--layout", "llama.cpp"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "llama.cpp has no mllama support" in r.stderr


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def _cfg(fn):
    return lambda d: edit_json(d / "config.json", fn)


def _pp(fn):
    return lambda d: edit_json(d / "preprocessor_config.json", fn)


def _tok(fn):
    return lambda d: edit_json(d / "tokenizer.json", fn)


@pytest.mark.parametrize("edit,match", [
    (_cfg(lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn")), "RoPE scaling type 'yarn'"),
    (_cfg(lambda c: c["text_config"].update(cross_attention_layers=[1, 7])), "cross_attention_layers .* below"),
    (_cfg(lambda c: c["text_config"].update(cross_attention_layers=[1, 1])), "cross_attention_layers .* distinct"),
    (_cfg(lambda c: c["vision_config"].update(vision_output_dim=64)), "vision_output_dim 64"),
    (_cfg(lambda c: c["vision_config"].update(intermediate_layers_indices=[0, 5])),
     "intermediate_layers_indices .* outside"),
    (_cfg(lambda c: c["vision_config"].update(hidden_act="quick_gelu")), "vision hidden_act 'quick_gelu'"),
    (_cfg(lambda c: c["vision_config"].update(supported_aspect_ratios=[[1, 1], [2, 1]])),
     "aspect ratios .* differ"),
    (_cfg(lambda c: c["text_config"].update(intermediate_size=96)), r"shape \(160, 64\), expected \(96, 64\)"),
    (_cfg(lambda c: c.update(architectures=["MllamaForCausalLM"], model_type="mllama_text_model")),
     "unsupported architecture"),
    (_pp(lambda c: c.update(max_image_tiles=2)), "max_image_tiles 2 differs"),
    (_pp(lambda c: c.update(size={"height": 56, "width": 56})), "tile size 56 differs"),
    (_pp(lambda c: c.update(size={"height": 28, "width": 56})), "square tiles"),
    (_tok(lambda t: t["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex="\\s+")),
     "unsupported pre-tokenizer split"),
    (_tok(lambda t: t["model"].update(byte_fallback=True)), "not a byte-level BPE"),
    (_tok(lambda t: t["added_tokens"].append(dict(t["added_tokens"][-1], id=200000, content="<x>"))),
     "id 200000 >= embedding rows 128264"),
    (_tok(lambda t: t["model"].update(merges=[["a", "b", "c"]])), "merge 0"),
])
def test_config_errors(mllama_tiny, tmp_path, edit, match):
    d = copy_model(mllama_tiny.hf_dir, tmp_path / "m")
    edit(d)
    with pytest.raises(ConversionError, match=match):
        convert(d, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    assert not list(tmp_path.glob("*.part"))


def test_missing_and_unexpected_tensors(mllama_tiny, tmp_path):
    d = copy_model(mllama_tiny.hf_dir, tmp_path / "m")
    gate = "language_model.model.layers.3.cross_attn_mlp_gate"
    rewrite_weights(d, lambda sd: {k: v for k, v in sd.items() if k != gate})
    with pytest.raises(ConversionError, match=r"missing tensor 'layers.3.cross_attn_mlp_gate'.*blk.3.cross_attn_mlp"):
        convert(d, tmp_path / "m.gguf")
    d2 = copy_model(mllama_tiny.hf_dir, tmp_path / "m2")
    rewrite_weights(d2, lambda sd: dict(sd, **{"vision_model.extra": np.zeros(3, np.float32)}))
    with pytest.raises(ConversionError, match="tensors not used by the conversion: vision_model.extra"):
        convert(d2, tmp_path / "m.gguf")
    d3 = copy_model(mllama_tiny.hf_dir, tmp_path / "m3")
    rewrite_weights(d3, lambda sd: dict(sd, **{"image_newline": np.zeros(3, np.float32)}))
    with pytest.raises(ConversionError, match="unexpected tensors for Llama-3.2-Vision: image_newline"):
        convert(d3, tmp_path / "m.gguf")
    # a cross layer listed in config.json whose weights are self-attention ones
    d4 = copy_model(mllama_tiny.hf_dir, tmp_path / "m4")
    edit_json(d4 / "config.json", lambda c: c["text_config"].update(cross_attention_layers=[0, 3]))
    with pytest.raises(ConversionError, match="missing tensor 'layers.0.cross_attn.q_proj.weight'"):
        convert(d4, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_missing_tokenizer(mllama_tiny, tmp_path):
    d = copy_model(mllama_tiny.hf_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer found"):
        convert(d, tmp_path / "m.gguf")


# ------------------------------------------------------------------------------------------------
# config parsing without a model: Llama-3.2-11B-Vision(-Instruct)
# ------------------------------------------------------------------------------------------------

# meta-llama/Llama-3.2-11B-Vision-Instruct's config.json (transformers 4.45: rope_theta + rope_scaling).
LLAMA32_11B_CONFIG = {
    "architectures": ["MllamaForConditionalGeneration"], "image_token_index": 128256, "model_type": "mllama",
    "text_config": {
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "dropout": 0,
        "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "mllama_text_model",
        "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256, "bos_token_id": 128000,
        "pad_token_id": 128004},
    "vision_config": {
        "attention_heads": 16, "hidden_act": "gelu", "hidden_size": 1280, "image_size": 560,
        "intermediate_layers_indices": [3, 7, 15, 23, 30], "intermediate_size": 5120, "max_num_tiles": 4,
        "model_type": "mllama_vision_model", "norm_eps": 1e-05, "num_channels": 3, "num_global_layers": 8,
        "num_hidden_layers": 32, "patch_size": 14,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        "vision_output_dim": 7680},
}
LLAMA32_11B_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "MllamaImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "max_image_tiles": 4, "resample": 2,
    "rescale_factor": 0.00392156862745098, "size": {"height": 560, "width": 560}}


def test_llama32_11b_config():
    hp = parse_mllama_config(LLAMA32_11B_CONFIG)
    t, v = hp.text, hp.vision
    assert (t.hidden, t.ff, t.n_layers, t.n_heads, t.n_kv_heads, t.head_dim) == (4096, 14336, 40, 32, 8, 128)
    assert t.cross_layers == [3, 8, 13, 18, 23, 28, 33, 38] and t.vocab_size == 128256
    assert t.rope_theta == 500000.0 and t.rope_llama3["original_max_position_embeddings"] == 8192
    assert (v.hidden, v.ff, v.n_layers, v.n_global_layers, v.n_heads) == (1280, 5120, 32, 8, 16)
    assert (v.image_size, v.patch_size, v.n_positions, v.max_tiles, v.output_dim) == (560, 14, 1601, 4, 7680)
    assert v.intermediate_layers == [3, 7, 15, 23, 30] and v.n_aspect_ids == 9
    assert hp.image_token_id == 128256
    im = mllama_image_params(LLAMA32_11B_PREPROCESSOR, v, "preprocessor_config.json")
    assert (im["tile_size"], im["max_image_tiles"], im["resample"], im["do_pad"]) == (560, 4, 2, True)
    im = mllama_image_params(None, v, "preprocessor_config.json")  # absent: the processor's class defaults
    assert im["tile_size"] == 560 and im["image_mean"] == [0.5, 0.5, 0.5]


def test_llama32_11b_rope_factors_match_transformers():
    pytest.importorskip("torch")
    from transformers import MllamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pyvtrim.conversion.mllama import llama3_rope_freq_factors

    hp = parse_mllama_config(LLAMA32_11B_CONFIG)
    factors = llama3_rope_freq_factors(hp.text.rope_theta, hp.text.head_dim, hp.text.rope_llama3)
    cfg = MllamaConfig(**{k: v for k, v in LLAMA32_11B_CONFIG.items() if k != "architectures"}).text_config
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    base_inv = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    np.testing.assert_allclose(base_inv / factors, hf_inv.numpy(), rtol=1e-5)
