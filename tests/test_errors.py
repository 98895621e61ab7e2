"""Bad input gets a clear Python exception (never a crash, never a partial result), and the Model stays
usable after a failed call. Exceptions are checked by their built-in base (FileNotFoundError,
ValueError) as callers catch them, and by VtrimError."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyvtrim
from pyvtrim import _ffi, errors

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:  # the C library is not built: nothing here can run
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

IMAGE = np.random.default_rng(3).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model(llava_tiny):
    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=256, kv_type="f32", n_threads=2) as m:
        yield m


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ---- model files ------------------------------------------------------------------------------

def test_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError) as info:
        pyvtrim.Model(missing)
    assert isinstance(info.value, pyvtrim.VtrimError)
    assert info.value.filename == str(missing)


def test_missing_mmproj_file(llava_tiny, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pyvtrim.Model(llava_tiny.gguf, mmproj=tmp_path / "mmproj.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("these are not the weights you are looking for\n" * 20)
    with pytest.raises(pyvtrim.VtrimError) as info:
        pyvtrim.Model(path)
    assert info.value.code == errors.ERR_FORMAT, info.value
    assert str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(pyvtrim.VtrimError):
        pyvtrim.Model(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(pyvtrim.VtrimError):
        pyvtrim.Model(tmp_path)


@pytest.mark.parametrize("keep", [16, 0.1, 0.5, 0.99])
def test_truncated_gguf(llava_tiny, tmp_path: Path, keep: float) -> None:
    data = Path(llava_tiny.gguf).read_bytes()
    n = int(keep) if keep >= 1 else int(len(data) * keep)
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:n])
    with pytest.raises(pyvtrim.VtrimError) as info:
        pyvtrim.Model(path)
    assert info.value.code in (errors.ERR_FORMAT, errors.ERR_IO), info.value


def test_unknown_architecture(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_name("not-a-vlm")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(8)
    # A real mamba file has a tokenizer: the architecture must be what the runtime objects to.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581hello"]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(pyvtrim.VtrimError) as info:
        pyvtrim.Model(path)
    assert info.value.code == errors.ERR_UNSUPPORTED, info.value
    assert "mamba" in str(info.value)


def test_vocabulary_gguf_is_not_a_model() -> None:
    path = pyvtrim.data_path("ggml-vocab-llama-spm.gguf")
    if not os.path.exists(path):
        pytest.skip("the vocabulary files are not installed")
    with pytest.raises(pyvtrim.VtrimError):
        pyvtrim.Model(path)


def test_bad_runtime_options(llava_tiny) -> None:
    with pytest.raises(ValueError):
        pyvtrim.Model(llava_tiny.gguf, device="tpu")
    with pytest.raises(ValueError):
        pyvtrim.Model(llava_tiny.gguf, kv_type="q4_0")


def test_gpu_without_gpu_backend(llava_tiny) -> None:
    if set(pyvtrim.backends()) - {"CPU", "BLAS"}:
        pytest.skip(f"a GPU backend is compiled in: {pyvtrim.backends()}")
    with pytest.raises(pyvtrim.VtrimUnsupportedError):
        pyvtrim.Model(llava_tiny.gguf, device="gpu")


def test_library_missing_is_clear_and_lazy(tmp_path: Path) -> None:
    code = (
        "import pyvtrim, sys\n"
        "try:\n"
        "    pyvtrim.Model(sys.argv[1])\n"
        "except pyvtrim.VtrimLibraryError as e:\n"
        "    print('LIBRARY-ERROR', e)\n"
    )
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    package_parent = str(Path(pyvtrim.__file__).resolve().parents[1])
    env = dict(os.environ, VTRIM_LIBRARY=str(tmp_path / "libnothing.so"),
               PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code, str(model)], env=env, capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "LIBRARY-ERROR" in r.stdout and "libnothing.so" in r.stdout


# ---- images -----------------------------------------------------------------------------------

def test_missing_image_file(model, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        model.chat(tmp_path / "cat.jpg", "What is this?")


@pytest.mark.parametrize("kind", ["empty-file", "garbage-file", "truncated-png", "garbage-bytes", "empty-bytes"])
def test_corrupt_image(model, tmp_path: Path, kind: str) -> None:
    png = _png_bytes(IMAGE)
    path = tmp_path / "broken.png"
    image: object = path
    if kind == "empty-file":
        path.write_bytes(b"")
    elif kind == "garbage-file":
        path.write_bytes(os.urandom(1000))
    elif kind == "truncated-png":
        path.write_bytes(png[: len(png) // 2])
    elif kind == "garbage-bytes":
        image = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    else:
        image = b""
    with pytest.raises(ValueError) as info:
        model.chat(image, "What is this?", max_tokens=1)
    assert isinstance(info.value, pyvtrim.VtrimImageError)
    model.chat(IMAGE, "What is this?", max_tokens=1)  # still usable


@pytest.mark.parametrize("array", [
    IMAGE.astype(np.float32),
    IMAGE[:, :, 0],
    np.dstack([IMAGE, IMAGE[:, :, :1]]),
    np.zeros((0, 10, 3), dtype=np.uint8),
])
def test_bad_image_arrays(model, array: np.ndarray) -> None:
    with pytest.raises(ValueError):
        model.preprocess(array)


def test_non_contiguous_array_is_accepted(model) -> None:
    view = np.asarray(IMAGE[:, ::-1])
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(model.preprocess(view), model.preprocess(np.ascontiguousarray(view)))


def test_image_count_must_match_placeholders(model) -> None:
    tokens = model.tokenize(model.chat_prompt("What is this?", 1))
    with pytest.raises(ValueError, match="placeholder"):
        model.forward(tokens, [])
    with pytest.raises(ValueError, match="placeholder"):
        model.forward(tokens, [IMAGE, IMAGE])
    with pytest.raises(ValueError):
        model.forward(model.tokenize("no image here"), IMAGE)


def test_image_count_checked_in_c_too(model) -> None:
    """The C API checks the count itself (the Python check above runs first)."""
    ffi, lib = _ffi.get()[:2]
    tokens = model.tokenize(model.chat_prompt("What is this?", 1))
    arr = ffi.new("int32_t[]", tokens)
    model._reset()
    assert lib.vtrim_prefill(model._ctx(), arr, len(tokens), ffi.NULL, 0) == errors.ERR_INVALID_ARG
    assert _ffi.last_error()


# ---- tokens and the context -------------------------------------------------------------------

def test_prompt_longer_than_n_ctx(llava_tiny) -> None:
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=64, n_threads=2) as m:
        long_prompt = m.tokenize("hello world " * 200)
        with pytest.raises(ValueError) as info:
            m.forward(long_prompt)
        assert isinstance(info.value, pyvtrim.VtrimContextFullError)
        with pytest.raises(ValueError):
            m.generate(long_prompt, max_tokens=2)
        # Image tokens count: the text fits in 64, the text plus the image does not.
        n_img = m.info["n_image_tokens"]
        text = m.tokenize("word " * (64 - n_img // 2))
        assert len(text) < 64 < len(text) + n_img
        with pytest.raises(pyvtrim.VtrimContextFullError):
            m.forward(text + [m.image_token_id], [IMAGE])
        assert m.forward(m.tokenize("short")).shape == (m.n_vocab,)  # still usable


def test_generation_stops_when_the_context_is_full(llava_tiny) -> None:
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=64, n_threads=2) as m:
        prompt = m.tokenize("word " * 50)
        out = m.generate(prompt, max_tokens=200)
        assert len(out) < 200


@pytest.mark.parametrize("bad", [[1, 10**6], [1, -5]])
def test_token_ids_out_of_range(model, bad: list) -> None:
    with pytest.raises(ValueError):
        model.forward(bad)
    with pytest.raises(ValueError):
        model.detokenize(bad)


def test_malformed_token_sequences(model) -> None:
    with pytest.raises(ValueError):
        model.forward([])
    with pytest.raises(ValueError):
        model.forward([[1, 2], [3, 4]])
    with pytest.raises(ValueError):
        model.forward([1, 2**40])


@pytest.mark.parametrize("params", [
    dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-1),
])
def test_invalid_sampling_parameters(model, params: dict) -> None:
    tokens = model.tokenize("hello")
    with pytest.raises(ValueError):
        model.generate(tokens, max_tokens=2, **params)
    with pytest.raises(ValueError):
        model.chat(IMAGE, "hello", max_tokens=2, **params)


def test_unknown_reduction(model) -> None:
    with pytest.raises(ValueError):
        model.forward(model.tokenize("hello"), reduce="fastv please")


# ---- lifetime ---------------------------------------------------------------------------------

def test_use_after_close(llava_tiny) -> None:
    m = pyvtrim.Model(llava_tiny.gguf, n_ctx=128, n_threads=2)
    stream = m.chat(IMAGE, "What is this?", max_tokens=8, stream=True)
    chat = m.start_chat()
    m.close()
    m.close()  # twice is fine
    assert m.closed
    calls = [
        lambda: m.tokenize("hello"),
        lambda: m.detokenize([1, 2]),
        lambda: m.forward([1, 2]),
        lambda: m.generate([1, 2]),
        lambda: m.chat(IMAGE, "hi"),
        lambda: m.preprocess(IMAGE),
        lambda: m.info,
        lambda: m.last_stats,
        lambda: list(stream),
        lambda: chat.ask("hi"),
    ]
    for call in calls:
        with pytest.raises(pyvtrim.VtrimClosedError):
            call()


def test_with_block_closes(llava_tiny) -> None:
    with pyvtrim.Model(llava_tiny.gguf, n_ctx=128, n_threads=2) as m:
        assert not m.closed
    assert m.closed
    with pytest.raises(pyvtrim.VtrimError):
        m.forward([1])


def test_stream_notices_another_sequence(model) -> None:
    stream = model.chat(IMAGE, "What is this?", max_tokens=16, stream=True)
    model.forward(model.tokenize("something else"))
    with pytest.raises(pyvtrim.VtrimStateError):
        list(stream)
