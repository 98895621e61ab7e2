"""llama.cpp's own two-file LLaVA-1.5 layout (text GGUF + mmproj GGUF), as its legacy converter writes it.

The converter writes a tiny model both ways (layout "single" and "llama.cpp"); the runtime must give the
same logits and the same generations from both. The llama.cpp layout differs in ways the loader must undo:
clip.vision.block_count is the number of CLIP layers HF runs (n - 1 for vision_feature_layer -2), fc1/fc2
are stored as ffn_down/ffn_up, there are no vtrim.* keys (image preprocessing falls back to CLIP's, read
from clip.vision.image_mean/std), and the conv kernel is always f16. Files from the original liuhaotian
checkpoint have no "<image>" token at all (vocabulary of 32000): the runtime then uses a virtual id.

Where a real llama.cpp is installed (the peer environment of tools/bench_peers.py), it loads our pair too.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import pyvtrim
from pyvtrim import _ffi

from peer_env import peer_python

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:  # the C library is not built: nothing here can run
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

gguf = pytest.importorskip("gguf")

IMAGE = np.random.default_rng(11).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
QUESTION = "What is in the picture?"


def _open(fixture, outtype: str, layout: str, **kw) -> pyvtrim.Model:
    kw = dict(dict(n_ctx=512, kv_type="f32", n_threads=2), **kw)
    if layout == "single":
        return pyvtrim.Model(str(fixture.gguf_path(outtype)), **kw)
    return pyvtrim.Model(str(fixture.gguf_path(outtype, "llama.cpp")), mmproj=str(fixture.mmproj_path(outtype)), **kw)


def _prompt(m: pyvtrim.Model):
    return m.tokenize(m.chat_prompt(QUESTION, 1))


def rewrite_gguf(src: Path, dst: Path, kv=None, drop=(), tensor=None) -> Path:
    """Copies a GGUF, replacing keys (kv: name -> (value, GGUFValueType, sub_type or None)), dropping keys, and
    passing each tensor's data through tensor(name, array) (None: unchanged)."""
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    kv = dict(kv or {})
    for field in r.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name in drop:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if field.name in kv:
            value, vtype, sub = kv.pop(field.name)
        else:
            value = field.contents()
        w.add_key_value(field.name, value, vtype, sub_type=sub)
    for name, (value, vtype, sub) in kv.items():
        w.add_key_value(name, value, vtype, sub_type=sub)
    datas = []
    for t in r.tensors:
        data = t.data if tensor is None else tensor(t.name, t.data)
        datas.append(data)
        w.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for data in datas:
        w.write_tensor_data(np.ascontiguousarray(data))
    w.close()
    return dst


# ---- the two layouts agree ------------------------------------------------------------------------

@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("which", ["llava_tiny", "llava_tiny_gqa"])
def test_same_logits(request, which: str, outtype: str) -> None:
    """Same weights in both files (the legacy conv kernel is f16, as in an f16 single file): identical logits,
    with and without a reduction."""
    fixture = request.getfixturevalue(which)
    with _open(fixture, outtype, "single") as a, _open(fixture, outtype, "llama.cpp") as b:
        ids = _prompt(a)
        assert _prompt(b) == ids
        np.testing.assert_array_equal(b.forward(ids, [IMAGE]), a.forward(ids, [IMAGE]))
        fastv = pyvtrim.FastV(k=1, ratio=0.5)
        np.testing.assert_array_equal(b.forward(ids, [IMAGE], reduce=fastv), a.forward(ids, [IMAGE], reduce=fastv))


def test_same_logits_f32(llava_tiny) -> None:
    """In an f32 pair only the conv kernel differs (llama.cpp's legacy mmproj always stores it as f16): the
    f16 rounding of one layer's weights (relative 2^-11) moves the logits by well under 1e-3 of their scale."""
    with _open(llava_tiny, "f32", "single") as a, _open(llava_tiny, "f32", "llama.cpp") as b:
        ids = _prompt(a)
        la, lb = a.forward(ids, [IMAGE]), b.forward(ids, [IMAGE])
        assert np.abs(la - lb).max() <= 1e-3 * np.abs(la).max()
        # text alone touches no vision weight: exact
        text = a.tokenize("USER: Hello there ASSISTANT:")
        np.testing.assert_array_equal(b.forward(text), a.forward(text))


def test_same_generation_and_info(llava_tiny) -> None:
    with _open(llava_tiny, "f16", "single") as a, _open(llava_tiny, "f16", "llama.cpp") as b:
        ids = _prompt(a)
        assert b.generate(ids, [IMAGE], max_tokens=12) == a.generate(ids, [IMAGE], max_tokens=12)
        assert b.chat(IMAGE, QUESTION, max_tokens=8) == a.chat(IMAGE, QUESTION, max_tokens=8)
        ia, ib = a.info, b.info
        for key in ("arch", "n_vocab", "n_embd", "n_layer", "image_size", "n_image_tokens", "image_token_id"):
            assert ib[key] == ia[key], key
        np.testing.assert_array_equal(b.preprocess(IMAGE), a.preprocess(IMAGE))


def test_preprocessing_defaults_to_clip(llava_tiny_pad, llava_tiny) -> None:
    """The legacy files say nothing about padding: the loader uses CLIPImageProcessor's resize + center crop
    (llava-hf's processor) with clip.vision.image_mean/std, never llama.cpp's pad-to-square."""
    with _open(llava_tiny_pad, "f16", "single") as pad, _open(llava_tiny_pad, "f16", "llama.cpp") as legacy, \
            _open(llava_tiny, "f16", "single") as crop:
        np.testing.assert_array_equal(legacy.preprocess(IMAGE), crop.preprocess(IMAGE))
        assert not np.array_equal(legacy.preprocess(IMAGE), pad.preprocess(IMAGE))
        # a square image at the tower's size needs neither padding nor cropping: the GELU tower then agrees
        side = pad.info["image_size"]
        square = np.random.default_rng(5).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        ids = _prompt(pad)
        np.testing.assert_array_equal(legacy.forward(ids, [square]), pad.forward(ids, [square]))


# ---- clip.vision.feature_layer ------------------------------------------------------------------------

def _mmproj_with(fixture, tmp_path: Path, layers) -> Path:
    arr = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32
    return rewrite_gguf(fixture.mmproj_path("f16"), tmp_path / "mmproj.gguf",
                        kv={"clip.vision.feature_layer": (list(layers), *arr)})


def test_feature_layer_key(llava_tiny, tmp_path: Path) -> None:
    """Newer legacy conversions write clip.vision.feature_layer (non-negative, hidden_states numbering) and
    store that many layers: the loader runs exactly those, as HF does."""
    n_blocks = llava_tiny.params["vision_layers"] - 1
    text = str(llava_tiny.gguf_path("f16", "llama.cpp"))
    with _open(llava_tiny, "f16", "single") as a, \
            pyvtrim.Model(text, mmproj=str(_mmproj_with(llava_tiny, tmp_path, [n_blocks])), n_ctx=512,
                          kv_type="f32", n_threads=2) as b:
        ids = _prompt(a)
        np.testing.assert_array_equal(b.forward(ids, [IMAGE]), a.forward(ids, [IMAGE]))


@pytest.mark.parametrize("layers,error,match", [
    ([1, 2], pyvtrim.VtrimUnsupportedError, "2 vision feature layers"),
    ([-1], pyvtrim.VtrimFormatError, "negative"),
    ([99], pyvtrim.VtrimFormatError, "outside"),
])
def test_feature_layer_key_errors(llava_tiny, tmp_path: Path, layers, error, match) -> None:
    text = str(llava_tiny.gguf_path("f16", "llama.cpp"))
    with pytest.raises(error, match=match):
        pyvtrim.Model(text, mmproj=str(_mmproj_with(llava_tiny, tmp_path, layers)))


# ---- a text file without "<image>" (llama.cpp's file from the original checkpoint) ----------------------

@pytest.fixture(scope="module")
def no_image_token_pair(llava_tiny, tmp_path_factory):
    """The llama.cpp-layout text file cut to the 32000 tokens of Llama-2's vocabulary (no "<image>", no
    "<pad>"), embeddings and output rows included, as llama.cpp's LLaVA-1.5 text file is."""
    src = llava_tiny.gguf_path("f16", "llama.cpp")
    r = gguf.GGUFReader(str(src))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    n = tokens.index("<image>")
    assert n == 32000
    arr = gguf.GGUFValueType.ARRAY
    kv = {
        "tokenizer.ggml.tokens": (tokens[:n], arr, gguf.GGUFValueType.STRING),
        "tokenizer.ggml.scores": (r.fields["tokenizer.ggml.scores"].contents()[:n], arr, gguf.GGUFValueType.FLOAT32),
        "tokenizer.ggml.token_type": (r.fields["tokenizer.ggml.token_type"].contents()[:n], arr,
                                      gguf.GGUFValueType.INT32),
        "llama.vocab_size": (n, gguf.GGUFValueType.UINT32, None),
    }
    cut = {"token_embd.weight", "output.weight"}
    dst = tmp_path_factory.mktemp("noimage") / "text-f16.gguf"
    rewrite_gguf(src, dst, kv=kv, drop={"tokenizer.ggml.padding_token_id"},
                 tensor=lambda name, data: data[:n] if name in cut else data)
    return dst, llava_tiny.mmproj_path("f16")


def test_virtual_image_token(llava_tiny, no_image_token_pair) -> None:
    text, mmproj = no_image_token_pair
    with pyvtrim.Model(str(text), mmproj=str(mmproj), n_ctx=512, kv_type="f32", n_threads=2) as b, \
            _open(llava_tiny, "f16", "single") as a:
        assert b.n_vocab == 32000 and b.image_token_id == 32000   # one past the vocabulary
        prompt = b.chat_prompt(QUESTION, 1)
        assert prompt == a.chat_prompt(QUESTION, 1) == f"USER: <image>\n{QUESTION} ASSISTANT:"
        # The text around the placeholder is tokenized piece by piece, as LLaVA's tokenizer_image_token does.
        ids = b.tokenize(prompt)
        before, after = prompt.split("<image>")
        assert ids == b.tokenize(before) + [32000] + b.tokenize(after, add_special=False)
        assert b.tokenize("<image><image>", add_special=False) == [32000, 32000]
        assert b.tokenize("no image here") == a.tokenize("no image here")
        # The placeholder takes the image wherever its id comes from: the same logits as the single file on
        # the same ids (the single file's <image> is 32000 as well), over the 32000 rows both have.
        ids_a = _prompt(a)
        np.testing.assert_array_equal(b.forward(ids_a, [IMAGE]), a.forward(ids_a, [IMAGE])[:32000])
        np.testing.assert_array_equal(b.forward(ids, [IMAGE]), b.forward(ids, [IMAGE]))
        assert isinstance(b.chat(IMAGE, QUESTION, max_tokens=4), str)
        with pytest.raises(pyvtrim.VtrimValueError):
            b.forward(ids, [])   # a placeholder without its image


# ---- a real llama.cpp loads our pair -----------------------------------------------------------------

_LLAMA_CPP_PROBE = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler
text, mmproj, image_uri, prompt = sys.argv[1:5]
ids = [int(t) for t in prompt.split(",")]
llm = Llama(model_path=text, chat_handler=Llava15ChatHandler(clip_model_path=mmproj, verbose=False),
            n_ctx=512, n_threads=2, verbose=False)
llm.eval(ids)
ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)
out = llm.create_chat_completion(max_tokens=4, temperature=0.0, messages=[{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": image_uri}}, {"type": "text", "text": "What is this?"}]}])
print(json.dumps({"logits": logits.tolist(), "n_vocab": llm.n_vocab(),
                  "usage": out["usage"], "reply": out["choices"][0]["message"]["content"]}))
"""


def test_llama_cpp_loads_our_pair(llava_tiny, tmp_path: Path) -> None:
    py = peer_python()
    if py is None:
        pytest.skip("no llama-cpp-python peer environment (tools/bench_peers.py --setup builds it)")
    probe = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{py} has no llama_cpp")
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(IMAGE).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with _open(llava_tiny, "f16", "llama.cpp") as m:
        ids = m.tokenize("USER: Hello there, how are you? ASSISTANT:")
        ours = m.forward(ids).astype(np.float64)
        n_image_tokens = m.info["n_image_tokens"]
    text, mmproj = llava_tiny.gguf_path("f16", "llama.cpp"), llava_tiny.mmproj_path("f16")
    run = subprocess.run([py, "-c", _LLAMA_CPP_PROBE, str(text), str(mmproj), uri, ",".join(map(str, ids))],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["n_vocab"] == len(ours)
    # The text path: same weights, same tokens; only the order of f16/f32 accumulation differs.
    theirs = np.array(got["logits"])
    assert np.abs(theirs - ours).max() <= 2e-2 * np.abs(ours).max()
    assert int(np.argmax(theirs)) == int(np.argmax(ours))
    # The image path runs end to end; its prompt holds the image's tokens.
    assert got["usage"]["prompt_tokens"] > n_image_tokens
