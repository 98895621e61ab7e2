"""The HF -> GGUF converter: keys, tensor names, shapes, types, values, vocabulary, layouts, errors."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("safetensors")

import fixtures  # noqa: E402
from pyvtrim.conversion import ConversionError, convert  # noqa: E402
from pyvtrim.conversion.llava import permute_for_rope, unpermute_for_rope  # noqa: E402

T = gguf.GGMLQuantizationType
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


class Gguf:
    """A GGUF file read back: keys (as Python values) and tensors (type, numpy shape, f32 data).

    Opening is slow (GGUFReader parses the 32k vocabulary strings one by one: ~2 s), so files are
    read once per test session (see read_gguf)."""

    def __new__(cls, path):
        return read_gguf(str(path), Path(path).stat().st_mtime_ns)

    def _init(self, path):
        self.reader = gguf.GGUFReader(str(path))
        self.kv = {k: f.contents() for k, f in self.reader.fields.items()}
        self.tensors = {t.name: t for t in self.reader.tensors}

    def type(self, name):
        return self.tensors[name].tensor_type

    def shape(self, name):  # numpy order (ggml's ne reversed)
        return tuple(int(x) for x in reversed(self.tensors[name].shape))

    def f32(self, name):
        t = self.tensors[name]
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        return np.asarray(data, np.float32).reshape(self.shape(name))


@functools.lru_cache(maxsize=None)
def read_gguf(path: str, mtime_ns: int) -> "Gguf":
    g = object.__new__(Gguf)
    g._init(path)
    return g


def hf_tensors(hf_dir):
    from safetensors.numpy import load_file

    return load_file(str(Path(hf_dir) / "model.safetensors"))


def copy_model(src, dst) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("gguf-*"))
    return Path(dst)


def rewrite_weights(d: Path, fn) -> None:
    """Replace model.safetensors by fn(dict of arrays)."""
    from safetensors.numpy import save_file

    sd = hf_tensors(d)
    save_file(fn(dict(sd)), str(d / "model.safetensors"))


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


# The 4.x checkpoint names transformers 5.23 writes, for the tests' direct lookups.
TEXT = "language_model.model."
VIS = "vision_tower."


# ------------------------------------------------------------------------------------------------
# the single layout
# ------------------------------------------------------------------------------------------------


def test_keys(llava_tiny_gqa):
    g = Gguf(llava_tiny_gqa.gguf)
    p = llava_tiny_gqa.params
    kv = g.kv
    expect = {
        "general.architecture": "llama",
        "general.file_type": 0,
        "llama.context_length": p["max_pos"],
        "llama.embedding_length": p["text_hidden"],
        "llama.block_count": p["n_layers"],
        "llama.feed_forward_length": p["text_ff"],
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 50000.0,
        "llama.rope.dimension_count": p["text_hidden"] // p["n_heads"],
        "llama.vocab_size": fixtures.PADDED_VOCAB,
        "clip.has_vision_encoder": True,
        "clip.has_llava_projector": True,
        "clip.projector_type": "mlp",
        "clip.vision.image_size": p["image_size"],
        "clip.vision.patch_size": p["patch_size"],
        "clip.vision.embedding_length": p["vision_hidden"],
        "clip.vision.feed_forward_length": p["vision_ff"],
        "clip.vision.block_count": p["vision_layers"],
        "clip.vision.attention.head_count": p["vision_heads"],
        "clip.vision.projection_dim": p["text_hidden"],
        "clip.use_gelu": False,
        "vtrim.layout": "single",
        "vtrim.vision.feature_layer": -2,
        "vtrim.vision.feature_select": "default",
        "vtrim.projector.act": "gelu",
        "vtrim.image_token_id": fixtures.IMAGE_TOKEN_ID,
        "vtrim.chat_format": "llava-1.5",
        "vtrim.image.do_resize": True,
        "vtrim.image.shortest_edge": p["image_size"],
        "vtrim.image.resample": 3,
        "vtrim.image.do_center_crop": True,
        "vtrim.image.crop_height": p["image_size"],
        "vtrim.image.crop_width": p["image_size"],
        "vtrim.image.do_normalize": True,
        "vtrim.image.do_pad": False,
        "vtrim.image.do_convert_rgb": True,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": fixtures.PAD_TOKEN_ID,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    got = {k: kv.get(k) for k in expect}
    assert got == expect
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(p["rms_eps"])
    assert kv["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert kv["vtrim.image.rescale_factor"] == pytest.approx(1 / 255)
    np.testing.assert_allclose(kv["clip.vision.image_mean"], fixtures.CLIP_MEAN, rtol=1e-6)
    np.testing.assert_allclose(kv["clip.vision.image_std"], fixtures.CLIP_STD, rtol=1e-6)
    assert "ASSISTANT:" in kv["tokenizer.chat_template"]
    # the C loader reads these with exact types
    f = g.reader.fields
    assert f["vtrim.vision.feature_layer"].types == [gguf.GGUFValueType.INT32]
    assert f["vtrim.image_token_id"].types == [gguf.GGUFValueType.UINT32]
    assert f["clip.vision.image_mean"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]


def expected_shapes(p, n_vocab=fixtures.PADDED_VOCAB):
    H, F, hd = p["text_hidden"], p["text_ff"], p["text_hidden"] // p["n_heads"]
    vh, vf, P = p["vision_hidden"], p["vision_ff"], p["patch_size"]
    s = {"token_embd.weight": (n_vocab, H), "output_norm.weight": (H,), "output.weight": (n_vocab, H)}
    for i in range(p["n_layers"]):
        b = f"blk.{i}."
        s.update({b + "attn_norm.weight": (H,), b + "attn_q.weight": (p["n_heads"] * hd, H),
                  b + "attn_k.weight": (p["n_kv_heads"] * hd, H), b + "attn_v.weight": (p["n_kv_heads"] * hd, H),
                  b + "attn_output.weight": (H, p["n_heads"] * hd), b + "ffn_norm.weight": (H,),
                  b + "ffn_gate.weight": (F, H), b + "ffn_up.weight": (F, H), b + "ffn_down.weight": (H, F)})
    s.update({"v.class_embd": (vh,), "v.patch_embd.weight": (vh, 3, P, P),
              "v.position_embd.weight": ((p["image_size"] // P) ** 2 + 1, vh),
              "v.pre_ln.weight": (vh,), "v.pre_ln.bias": (vh,), "v.post_ln.weight": (vh,), "v.post_ln.bias": (vh,),
              "mm.0.weight": (H, vh), "mm.0.bias": (H,), "mm.2.weight": (H, H), "mm.2.bias": (H,)})
    for i in range(p["vision_layers"]):
        b = f"v.blk.{i}."
        for n in ("ln1", "ln2"):
            s.update({b + n + ".weight": (vh,), b + n + ".bias": (vh,)})
        for n in ("attn_q", "attn_k", "attn_v", "attn_out"):
            s.update({b + n + ".weight": (vh, vh), b + n + ".bias": (vh,)})
        s.update({b + "ffn_up.weight": (vf, vh), b + "ffn_up.bias": (vf,),
                  b + "ffn_down.weight": (vh, vf), b + "ffn_down.bias": (vh,)})
    return s


def test_tensor_names_and_shapes(llava_tiny_gqa):
    g = Gguf(llava_tiny_gqa.gguf)
    want = expected_shapes(llava_tiny_gqa.params)
    assert {n: g.shape(n) for n in g.tensors} == want


def _expected_type(name, shape, outtype):
    vector = len(shape) == 1 or name == "v.class_embd"
    if outtype == "f32" or vector:
        return T.F32
    if outtype == "f16" or name in ("v.patch_embd.weight", "v.position_embd.weight"):
        return T.F16
    return T.Q8_0 if shape[-1] % 32 == 0 else T.F16


@pytest.mark.parametrize("outtype,file_type", [("f32", 0), ("f16", 1), ("q8_0", 7)])
def test_types_per_outtype(llava_tiny_gqa, outtype, file_type):
    g = Gguf(llava_tiny_gqa.gguf_path(outtype))
    assert g.kv["general.file_type"] == file_type
    types = {n: g.type(n) for n in g.tensors}
    assert types == {n: _expected_type(n, g.shape(n), outtype) for n in g.tensors}
    if outtype == "q8_0":  # the tiny model has both cases: 160-wide rows quantize, 80-wide do not
        assert types["blk.0.ffn_down.weight"] == T.Q8_0
        assert types["v.blk.0.ffn_down.weight"] == T.F16


def _hf_name(gname, p):
    """The 4.x checkpoint name of a GGUF tensor (inverse of the converter's table, written out again)."""
    fixed = {"token_embd.weight": TEXT + "embed_tokens.weight", "output_norm.weight": TEXT + "norm.weight",
             "output.weight": "language_model.lm_head.weight", "v.class_embd": VIS + "embeddings.class_embedding",
             "v.patch_embd.weight": VIS + "embeddings.patch_embedding.weight",
             "v.position_embd.weight": VIS + "embeddings.position_embedding.weight",
             "v.pre_ln.weight": VIS + "pre_layrnorm.weight", "v.pre_ln.bias": VIS + "pre_layrnorm.bias",
             "v.post_ln.weight": VIS + "post_layernorm.weight", "v.post_ln.bias": VIS + "post_layernorm.bias",
             "mm.0.weight": "multi_modal_projector.linear_1.weight", "mm.0.bias": "multi_modal_projector.linear_1.bias",
             "mm.2.weight": "multi_modal_projector.linear_2.weight", "mm.2.bias": "multi_modal_projector.linear_2.bias"}
    if gname in fixed:
        return fixed[gname]
    parts = gname.split(".")
    if parts[0] == "blk":
        i, what = parts[1], parts[2]
        hf = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[what]
        return f"{TEXT}layers.{i}.{hf}.weight"
    i, what, kind = parts[2], parts[3], parts[4]
    hf = {"ln1": "layer_norm1", "ln2": "layer_norm2", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1",
          "ffn_down": "mlp.fc2"}[what]
    return f"{VIS}encoder.layers.{i}.{hf}.{kind}"


@pytest.mark.parametrize("outtype,atol", [("f32", 0.0), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_values_match_hf(llava_tiny_gqa, outtype, atol):
    """Every tensor equals its HF weight (Q/K after undoing the RoPE permutation), up to the storage type.

    Tolerances: f32 exact; f16 rounding of weights |w| < ~1 is < 1e-3 (we allow 2e-3);
    Q8_0 error is at most half a step of max|block|/127 (weights here reach ~1: < 1e-2, allow 2e-2).
    """
    p = llava_tiny_gqa.params
    g = Gguf(llava_tiny_gqa.gguf_path(outtype))
    sd = hf_tensors(llava_tiny_gqa.hf_dir)
    for name in g.tensors:
        got = g.f32(name)
        if ".attn_q." in name and not name.startswith("v."):
            got = unpermute_for_rope(got, p["n_heads"])
        elif ".attn_k." in name and not name.startswith("v."):
            got = unpermute_for_rope(got, p["n_kv_heads"])
        want = sd[_hf_name(name, p)]
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


def test_qk_permutation_turns_rotate_half_into_adjacent_pairs():
    """HF's RoPE (rotate_half) on W equals ggml's normal-mode RoPE (adjacent pairs) on permute(W)."""
    rng = np.random.default_rng(0)
    n_head, d, hidden, n_pos, base = 3, 8, 12, 5, 50000.0
    w = rng.standard_normal((n_head * d, hidden))
    x = rng.standard_normal((n_pos, hidden))
    inv = base ** (-np.arange(0, d, 2) / d)                 # (d/2,)
    ang = np.arange(n_pos)[:, None] * inv[None, :]          # (pos, d/2)
    cos, sin = np.cos(ang), np.sin(ang)

    def hf_rope(q):  # q: (pos, head, d); pairs (i, i + d/2)
        a, b = q[..., : d // 2], q[..., d // 2:]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    def ggml_rope(q):  # pairs (2i, 2i + 1)
        a, b = q[..., 0::2], q[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(q)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
        return out

    q_hf = hf_rope((x @ w.T).reshape(n_pos, n_head, d))
    q_gg = ggml_rope((x @ permute_for_rope(w, n_head).T).reshape(n_pos, n_head, d))
    # the same rotated vector, with dimensions interleaved: dot products (attention scores) agree
    np.testing.assert_allclose(q_gg, q_hf.reshape(n_pos, n_head, 2, d // 2).swapaxes(-1, -2).reshape(q_hf.shape),
                               atol=1e-12)
    np.testing.assert_allclose(unpermute_for_rope(permute_for_rope(w, n_head), n_head), w)


@pytest.mark.parametrize("name", ["llava_tiny", "llava_tiny_gqa", "llava_tiny_pad"])
def test_numpy_forward_of_gguf_matches_transformers(request, name):
    """A numpy LLaVA forward over the f32 GGUF (ggml-style adjacent-pair RoPE, GGUF names and keys)
    gives transformers' logits: the conversion keeps the model's function, not only its numbers.

    Tolerance 1e-3 absolute on logits with a std of ~1: float32 (torch) against float64 (numpy).
    """
    torch = pytest.importorskip("torch")
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    import gguf_reference

    fx = request.getfixturevalue(name)
    p = fx.params
    model = LlavaForConditionalGeneration.from_pretrained(str(fx.hf_dir), dtype=torch.float32).eval()
    image = np.random.default_rng(1).integers(0, 256, size=(40, 70, 3), dtype=np.uint8)
    pixels = AutoImageProcessor.from_pretrained(str(fx.hf_dir))(images=[image], return_tensors="pt")["pixel_values"]
    n_img = (p["image_size"] // p["patch_size"]) ** 2
    ids = [1, 3148, 1001, 29901, 29871] + [fixtures.IMAGE_TOKEN_ID] * n_img + [13, 5618, 338, 445, 29973, 319]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), pixel_values=pixels.float()).logits[0].numpy()
    got = gguf_reference.llava_logits(gguf_reference.Weights(Gguf(fx.gguf)), ids, pixels[0].double().numpy())
    assert want.std() > 0.3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_vocab(llava_tiny):
    from sentencepiece import sentencepiece_model_pb2 as pb

    g = Gguf(llava_tiny.gguf)
    m = pb.ModelProto.FromString((llava_tiny.hf_dir / "tokenizer.model").read_bytes())
    tokens = g.kv["tokenizer.ggml.tokens"]
    scores = np.asarray(g.kv["tokenizer.ggml.scores"], np.float32)
    types = g.kv["tokenizer.ggml.token_type"]
    n = len(m.pieces)
    assert len(tokens) == len(scores) == len(types) == fixtures.PADDED_VOCAB
    assert tokens[:n] == [p.piece for p in m.pieces]
    np.testing.assert_array_equal(scores[:n], [p.score for p in m.pieces])
    assert types[:n] == [int(p.type) for p in m.pieces]
    assert tokens[32000:32002] == ["<image>", "<pad>"]
    assert types[32000:32002] == [3, 3]  # special added tokens: CONTROL
    assert tokens[32002:] == [f"[PAD{i}]" for i in range(32002, fixtures.PADDED_VOCAB)]
    assert set(types[32002:]) == {5}  # UNUSED
    assert types[0] == 2 and types[1] == 3 and types[2] == 3 and types[3] == 6  # <unk>, <s>, </s>, <0x00>


def test_vocab_from_tokenizer_json_only(llava_tiny, tmp_path):
    """Without tokenizer.model, the SPM vocabulary comes from tokenizer.json, scores from merge ranks.

    transformers 4.x wrote SentencePiece merges sorted by the merged piece's score; transformers 5
    writes them in vocabulary order, which puts "▁ ▁" (score -1e9 in Llama-2) first, so its own
    tokenizer.json no longer tokenizes runs of spaces as SentencePiece does. We re-sort the fixture's
    merges the 4.x way; then the derived scores make SentencePiece (the algorithm llama.cpp's SPM
    tokenizer follows) reproduce every Llama-2 test vector.
    """
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")
    score = {p.piece: p.score for p in pb.ModelProto.FromString((d / "tokenizer.model").read_bytes()).pieces}
    (d / "tokenizer.model").unlink()

    def by_score(tj):
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in tj["model"]["merges"]]
        tj["model"]["merges"] = sorted(merges, key=lambda m: -score[m[0] + m[1]])
    edit_json(d / "tokenizer.json", by_score)

    out = convert(d, tmp_path / "m.gguf", outtype="f16")[0]
    g = Gguf(out)
    ref = Gguf(llava_tiny.gguf)
    assert g.kv["tokenizer.ggml.tokens"] == ref.kv["tokenizer.ggml.tokens"]
    assert g.kv["tokenizer.ggml.token_type"] == ref.kv["tokenizer.ggml.token_type"]
    model = fixtures.build_spm_tokenizer_model(out, tmp_path / "derived.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    bad = [(t, ids) for t, ids in fixtures.read_vocab_tests(fixtures.vocab_path("ggml-vocab-llama-spm.gguf"))
           if sp.encode(t) != ids]
    assert not bad, bad[:3]


def test_tokenizer_json_byte_level_bpe_is_refused(llava_tiny, tmp_path):
    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")
    (d / "tokenizer.model").unlink()
    edit_json(d / "tokenizer.json", lambda tj: (tj["model"].update(byte_fallback=False),
                                                tj.update(pre_tokenizer={"type": "ByteLevel"})))
    with pytest.raises(ConversionError, match="not a SentencePiece-style BPE tokenizer"):
        convert(d, tmp_path / "m.gguf")


def test_variant_keys(llava_tiny_pad):
    kv = Gguf(llava_tiny_pad.gguf).kv
    assert kv["vtrim.image.do_pad"] is True
    assert kv["clip.use_gelu"] is True


# ------------------------------------------------------------------------------------------------
# input variants: transformers 5 names, shards, bf16, tied embeddings
# ------------------------------------------------------------------------------------------------


def _same_tensors(a, b):
    ga, gb = Gguf(a), Gguf(b)
    assert set(ga.tensors) == set(gb.tensors)
    for n in ga.tensors:
        np.testing.assert_array_equal(ga.f32(n), gb.f32(n), err_msg=n)


def test_transformers5_names(llava_tiny, tmp_path):
    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")

    def rename(sd):
        out = {}
        for k, v in sd.items():
            k = k.replace("language_model.model.", "model.language_model.")
            k = k.replace("language_model.lm_head.", "lm_head.")
            k = k.replace("vision_tower.", "model.vision_tower.", 1) if k.startswith("vision_tower.") else k
            k = "model." + k if k.startswith("multi_modal_projector.") else k
            out[k] = v
        return out
    rewrite_weights(d, rename)
    assert any(k.startswith("model.language_model.") for k in hf_tensors(d))
    _same_tensors(convert(d, tmp_path / "m.gguf", "f32")[0], llava_tiny.gguf)


def test_sharded_checkpoint(llava_tiny, tmp_path):
    from safetensors.numpy import save_file

    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")
    sd = hf_tensors(d)
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(d / fname))
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _same_tensors(convert(d, tmp_path / "m.gguf", "f32")[0], llava_tiny.gguf)


def test_bf16_checkpoint(llava_tiny, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")
    sd = hf_tensors(d)
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}, str(d / "model.safetensors"))
    g = Gguf(convert(d, tmp_path / "m.gguf", "f32")[0])
    want = torch.from_numpy(sd[TEXT + "layers.0.mlp.up_proj.weight"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(g.f32("blk.0.ffn_up.weight"), want)
    want = torch.from_numpy(sd[VIS + "embeddings.patch_embedding.weight"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(g.f32("v.patch_embd.weight"), want)


def test_tied_embeddings(llava_tiny, tmp_path):
    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")
    rewrite_weights(d, lambda sd: {k: v for k, v in sd.items() if "lm_head" not in k})
    edit_json(d / "config.json", lambda c: (c.update(tie_word_embeddings=True),
                                            c["text_config"].update(tie_word_embeddings=True)))
    g = Gguf(convert(d, tmp_path / "m.gguf", "f32")[0])
    np.testing.assert_array_equal(g.f32("output.weight"), g.f32("token_embd.weight"))


# ------------------------------------------------------------------------------------------------
# llama.cpp's two-file layout
# ------------------------------------------------------------------------------------------------


def test_llamacpp_layout(llava_tiny_gqa):
    p = llava_tiny_gqa.params
    text = Gguf(llava_tiny_gqa.gguf_path("f32", layout="llama.cpp"))
    proj = Gguf(llava_tiny_gqa.mmproj_path("f32"))
    single = Gguf(llava_tiny_gqa.gguf)
    assert text.kv["general.architecture"] == "llama"
    assert not any(k.startswith(("clip.", "vtrim.")) for k in text.kv)
    assert set(text.tensors) == {n for n in single.tensors if not n.startswith(("v.", "mm."))}
    assert text.kv["tokenizer.ggml.tokens"] == single.kv["tokenizer.ggml.tokens"]

    assert proj.kv["general.architecture"] == "clip"
    assert proj.kv["clip.has_text_encoder"] is False
    assert proj.kv["clip.has_llava_projector"] is True
    n_blocks = p["vision_layers"] - 1  # vision_feature_layer -2: the last layer is dropped
    assert proj.kv["clip.vision.block_count"] == n_blocks
    assert not any(n.startswith("v.post_ln") for n in proj.tensors)
    assert not any(n.startswith(f"v.blk.{n_blocks}.") for n in proj.tensors)
    assert proj.type("v.patch_embd.weight") == T.F16  # as llama.cpp's legacy converter stores it
    # fc1 (hidden -> intermediate) is stored under ffn_down, fc2 under ffn_up
    np.testing.assert_array_equal(proj.f32("v.blk.0.ffn_down.weight"), single.f32("v.blk.0.ffn_up.weight"))
    np.testing.assert_array_equal(proj.f32("v.blk.0.ffn_up.bias"), single.f32("v.blk.0.ffn_down.bias"))
    np.testing.assert_array_equal(proj.f32("mm.0.weight"), single.f32("mm.0.weight"))
    for n in ("clip.vision.image_size", "clip.vision.patch_size", "clip.vision.embedding_length",
              "clip.vision.feed_forward_length", "clip.vision.attention.head_count", "clip.use_gelu"):
        assert proj.kv[n] == single.kv[n], n


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next"),
     "unsupported architecture"),
    (lambda c: (c.pop("architectures"), c.update(model_type="qwen2_vl")), "unsupported model_type 'qwen2_vl'"),
    (lambda c: c.update(vision_feature_layer=[-2, -5]), "vision_feature_layer .* unsupported"),
    (lambda c: c["vision_config"].update(model_type="siglip_vision_model"), "siglip_vision_model"),
    (lambda c: c["text_config"].update(intermediate_size=96), r"shape \(160, 64\), expected \(96, 64\)"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 1e4}), "RoPE scaling"),
])
def test_config_errors(llava_tiny, tmp_path, edit, match):
    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")
    edit_json(d / "config.json", edit)
    with pytest.raises(ConversionError, match=match):
        convert(d, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    assert not list(tmp_path.glob("*.part"))


def test_missing_files(llava_tiny, tmp_path):
    with pytest.raises(ConversionError, match="config.json: file not found"):
        convert(tmp_path, tmp_path / "x.gguf")
    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")
    for name in ("tokenizer.model", "tokenizer.json"):
        (d / name).unlink()
    with pytest.raises(ConversionError, match="no tokenizer found"):
        convert(d, tmp_path / "x.gguf")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="no \\*.safetensors.*pytorch_model.bin is not supported"):
        convert(d, tmp_path / "x.gguf")


def test_missing_tensor(llava_tiny, tmp_path):
    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")
    rewrite_weights(d, lambda sd: {k: v for k, v in sd.items() if k != TEXT + "layers.1.mlp.up_proj.weight"})
    with pytest.raises(ConversionError, match=r"missing tensor 'layers.1.mlp.up_proj.weight'.*blk.1.ffn_up"):
        convert(d, tmp_path / "m.gguf")


def test_unexpected_tensor(llava_tiny, tmp_path):
    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")
    rewrite_weights(d, lambda sd: dict(sd, **{"image_newline": np.zeros(4, np.float32)}))
    with pytest.raises(ConversionError, match="unexpected tensors for LLaVA: image_newline"):
        convert(d, tmp_path / "m.gguf")


def test_bad_outtype_and_layout(llava_tiny, tmp_path):
    with pytest.raises(ConversionError, match="outtype"):
        convert(llava_tiny.hf_dir, tmp_path / "m.gguf", outtype="q4_0")
    with pytest.raises(ConversionError, match="layout"):
        convert(llava_tiny.hf_dir, tmp_path / "m.gguf", layout="two")


def test_corrupt_safetensors(llava_tiny, tmp_path):
    d = copy_model(llava_tiny.hf_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ConversionError, match="model.safetensors: cannot read safetensors header"):
        convert(d, tmp_path / "m.gguf")


def test_cli(llava_tiny, tmp_path):
    out = tmp_path / "cli.gguf"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_gguf.py"), str(llava_tiny.hf_dir),
                        "--outfile", str(out), "--outtype", "f16", "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Gguf(out).kv["general.file_type"] == 1
    r = subprocess.run([sys.executable, "-m", "pyvtrim.conversion", str(tmp_path / "nowhere"), "--outfile",
                        str(tmp_path / "y.gguf")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1
    assert "error:" in r.stderr and "config.json: file not found" in r.stderr


# ------------------------------------------------------------------------------------------------
# the demo model (numpy weights through the same writer)
# ------------------------------------------------------------------------------------------------


def test_demo_model(tmp_path, llama_spm_vocab):
    from pyvtrim.demo import write_demo_model

    path = write_demo_model(tmp_path / "demo.gguf")
    g = Gguf(path)
    kv = g.kv
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == 1
    assert (kv["llama.block_count"], kv["llama.embedding_length"], kv["llama.attention.head_count_kv"]) == (8, 512, 4)
    assert (kv["clip.vision.image_size"], kv["clip.vision.patch_size"], kv["clip.vision.block_count"]) == (336, 14, 6)
    assert g.shape("v.position_embd.weight") == (577, 256)
    assert kv["tokenizer.ggml.tokens"][32000] == "<image>" and len(kv["tokenizer.ggml.tokens"]) == 32064
    assert kv["vtrim.image_token_id"] == 32000
    mtime = path.stat().st_mtime_ns
    assert write_demo_model(path) == path and path.stat().st_mtime_ns == mtime  # reused when present


# ------------------------------------------------------------------------------------------------
# config parsing without a model
# ------------------------------------------------------------------------------------------------

# llava-hf/llava-1.5-7b-hf's config.json (transformers 4.36): most keys are left to the defaults.
LLAVA_15_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_llava_15_7b_config_defaults():
    from pyvtrim.conversion.llava import image_params, parse_llava_config

    hp = parse_llava_config(LLAVA_15_7B_CONFIG)
    t, v = hp.text, hp.vision
    assert (t.hidden, t.ff, t.n_layers, t.n_heads, t.n_kv_heads, t.head_dim) == (4096, 11008, 32, 32, 32, 128)
    assert (t.ctx, t.rms_eps, t.rope_theta, t.vocab_size, t.tie_embeddings) == (4096, 1e-5, 10000.0, 32064, False)
    assert (v.hidden, v.ff, v.n_layers, v.n_heads, v.image_size, v.patch_size) == (1024, 4096, 24, 16, 336, 14)
    assert (v.act, v.ln_eps, v.n_positions) == ("quick_gelu", 1e-5, 577)
    assert (hp.feature_layer, hp.feature_select, hp.projector_act, hp.image_token_id) == (-2, "default", "gelu", 32000)
    old_style = {"size": 336, "crop_size": 336, "do_pad": True}  # ints, as older processors saved them
    im = image_params(old_style, v, "preprocessor_config.json")
    assert (im["shortest_edge"], im["crop_height"], im["crop_width"], im["do_pad"]) == (336, 336, 336, True)
    assert im["resample"] == 3 and im["rescale_factor"] == pytest.approx(1 / 255)
    im = image_params(None, v, "preprocessor_config.json")  # absent: CLIP processing at the tower's size
    assert (im["shortest_edge"], im["crop_height"]) == (336, 336)
    with pytest.raises(ConversionError, match="size .* unsupported"):
        image_params({"size": {"height": 336, "width": 336}}, v, "preprocessor_config.json")
