"""Hostile files, each a named case: GGUF headers that lie (sizes that overflow, absurd dimensions, offsets past
the end, duplicate names, a 2^63-byte string, vocabularies with no tokens or no merges) and images that claim more
than they hold. Each must be refused with a clear error, quickly and without allocating what it claims: the
loader runs in a child process with an address-space cap of 2 GiB, so an attempt to allocate a claimed tensor or
image fails the test instead of the machine (under tools/sanitize.sh the cap is left to ASan's allocator, which
cannot start under it)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from gguf_craft import ARRAY, I32, STRING, U32, Gguf, gguf_string, llama_header

CAP_BYTES = 2 << 30

_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    if "asan" not in os.environ.get("LD_PRELOAD", ""):   # ASan reserves terabytes of shadow address space
        resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    import pyvtrim
    kind, path, vocab_only = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    try:
        if kind == "model":
            pyvtrim.Model(path, vocab_only=vocab_only, device="cpu", n_ctx=64)
        else:
            from pyvtrim import _ffi, images
            _ffi.get()[1].vtrim_image_free(images.load(path))
        print(json.dumps({{"ok": True}}))
    except Exception as e:
        print(json.dumps({{"ok": False, "type": type(e).__name__, "msg": str(e)}}))
""")


def _load(path: Path, kind: str = "model", vocab_only: bool = False) -> dict:
    """Loads in a child under the address-space cap; returns what happened."""
    r = subprocess.run([sys.executable, "-c", _CHILD.format(cap=CAP_BYTES), kind, str(path), "1" if vocab_only else "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"the loader crashed (exit {r.returncode}):\n{r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _refused(path: Path, *words: str, vocab_only: bool = False) -> str:
    got = _load(path, vocab_only=vocab_only)
    assert not got["ok"], "a hostile file loaded"
    assert got["type"] in ("VtrimFormatError", "VtrimUnsupportedError", "VtrimIOError"), got
    for w in words:
        assert w.lower() in got["msg"].lower(), got["msg"]
    return got["msg"]


def _write(tmp_path: Path, name: str, g: Gguf) -> Path:
    p = tmp_path / name
    p.write_bytes(g.bytes())
    return p


def test_tensor_size_overflowing_int64(tmp_path: Path) -> None:
    g = llama_header(Gguf()).tensor("token_embd.weight", [1 << 62, 1 << 62])
    _refused(_write(tmp_path, "overflow.gguf", g), "overflow")


def test_tensor_of_2_to_the_40_elements_in_a_tiny_file(tmp_path: Path) -> None:
    g = llama_header(Gguf()).tensor("token_embd.weight", [1 << 20, 1 << 20])
    _refused(_write(tmp_path, "huge.gguf", g), "truncated", "token_embd.weight")


def test_tensor_offset_past_the_end(tmp_path: Path) -> None:
    g = llama_header(Gguf(data=b"\0" * 64)).tensor("token_embd.weight", [8, 2], offset=1 << 40)
    _refused(_write(tmp_path, "offset.gguf", g), "offset")


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    g = llama_header(Gguf(data=b"\0" * 256)).tensor("output_norm.weight", [8]).tensor("output_norm.weight", [8],
                                                                                        offset=32)
    _refused(_write(tmp_path, "dup.gguf", g), "duplicate tensor name", "output_norm.weight")


def test_string_length_of_2_to_the_63(tmp_path: Path) -> None:
    raw = bytearray(llama_header(Gguf()).bytes())
    # replace the architecture value's length (right after its key and type) by 2^63
    key = gguf_string("general.architecture") + struct.pack("<I", STRING)
    at = raw.index(key) + len(key)
    raw[at:at + 8] = struct.pack("<Q", 1 << 63)
    p = tmp_path / "string.gguf"
    p.write_bytes(bytes(raw))
    _refused(p, "string length")


def test_counts_larger_than_the_file(tmp_path: Path) -> None:
    g = llama_header(Gguf(n_kv=1 << 40, n_tensors=1 << 40))
    _refused(_write(tmp_path, "counts.gguf", g), "not a valid GGUF")


def _vocab(model: str, tokens: list, merges: "list | None") -> Gguf:
    g = llama_header(Gguf()).add("tokenizer.ggml.model", STRING, model)
    g.add("tokenizer.ggml.tokens", ARRAY, tokens, STRING)
    if model == "llama":
        g.add("tokenizer.ggml.scores", ARRAY, [0.0] * len(tokens), 6)
    g.add("tokenizer.ggml.token_type", ARRAY, [1] * len(tokens), I32)
    if merges is not None:
        g.add("tokenizer.ggml.merges", ARRAY, merges, STRING)
    return g


def test_vocabulary_with_no_tokens(tmp_path: Path) -> None:
    _refused(_write(tmp_path, "empty-vocab.gguf", _vocab("llama", [], None)), "tokenizer.ggml.tokens has 0",
             vocab_only=True)


def test_bpe_vocabulary_without_merges(tmp_path: Path) -> None:
    _refused(_write(tmp_path, "no-merges.gguf", _vocab("gpt2", ["a", "b", "ab"], None)), "merges", vocab_only=True)


def test_token_id_keys_outside_the_vocabulary(tmp_path: Path) -> None:
    g = _vocab("llama", ["<unk>", "<s>", "</s>"], None).add("tokenizer.ggml.bos_token_id", U32, 1 << 31)
    _refused(_write(tmp_path, "bos.gguf", g), "outside the vocabulary", vocab_only=True)


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_png_claiming_100000_by_100000_pixels(tmp_path: Path) -> None:
    p = tmp_path / "huge.png"
    p.write_bytes(_png(100000, 100000, zlib.compress(b"\0" * 1000)))
    got = _load(p, kind="image")
    assert not got["ok"] and got["type"] == "VtrimImageError", got


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TGA"])
def test_truncated_image(tmp_path: Path, fmt: str) -> None:
    import io

    import numpy as np
    from PIL import Image

    arr = (np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    p = tmp_path / f"truncated.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    got = _load(p, kind="image")
    assert not got["ok"] and got["type"] == "VtrimImageError", got


def _refused_corpus_image(name: str) -> str:
    """Decodes tests/fuzz/corpus/image/<name> with the library (not Pillow); asserts it is refused with
    VTRIM_ERR_IMAGE and nothing allocated, and returns the message."""
    from pyvtrim import _ffi

    ffi, lib = _ffi.get()[:2]
    data = (Path(__file__).parent / "fuzz" / "corpus" / "image" / name).read_bytes()
    out = ffi.new("struct vtrim_image **")
    rc = lib.vtrim_image_from_memory(ffi.from_buffer("uint8_t[]", data), len(data), out)
    assert rc == lib.VTRIM_ERR_IMAGE and out[0] == ffi.NULL
    return ffi.string(lib.vtrim_last_error()).decode()


@pytest.mark.parametrize("name", ["tga-24-bytes-claiming-16mp", "tga-rle-489-bytes-claiming-67mp",
                                  "tga-17-bytes-cut-in-its-header-claiming-129mp"])
def test_tga_claiming_more_pixels_than_its_bytes_hold(name: str) -> None:
    """stb reads past the end of a TGA as zeros: these three (found by fuzz_image) decoded 16, 67 and 129 MP
    black images from a few hundred bytes or fewer, taking seconds; the last one's header is cut short. The
    library refuses them from the header, before decoding (an RLE packet holds at most 128 pixels)."""
    assert "truncated TGA" in _refused_corpus_image(name)


@pytest.mark.parametrize("name", ["jpeg-807-bytes-claiming-147mp", "jpeg-85-bytes-claiming-109mp"])
def test_jpeg_claiming_more_blocks_than_its_bytes_hold(name: str) -> None:
    """stb pads a short JPEG scan with zeros: these two (found by fuzz_image under ASan: 11 s and the slowest
    unit of the run) decoded 147 and 109 MP from under a kilobyte. Every 8x8 block costs at least one bit, so
    the library refuses them from the frame header, before decoding."""
    assert "truncated JPEG" in _refused_corpus_image(name)


@pytest.mark.parametrize("name, message", [("bmp-negative-compression-claiming-164mp", "broken BMP"),
                                           ("bmp-29-bytes-cut-in-its-header-claiming-50mp", "truncated BMP")])
def test_bmp_headers_that_stb_reads_as_uncompressed(name: str, message: str) -> None:
    """Found by fuzz_image (12 s and the run's slowest unit under ASan): stb takes a negative compression field
    for an uncompressed BMP, and reads a header cut short as zeros, so both decoded 50-164 MP of nothing. The
    header is now checked as stb reads it."""
    assert message in _refused_corpus_image(name)


@pytest.mark.parametrize("progressive", [False, True])
def test_flat_jpeg_at_the_best_compression_decodes(tmp_path: Path, progressive: bool) -> None:
    """The JPEG bound is not tighter than the format: a flat grey 2048 x 2048 image with optimised Huffman
    tables (2.0 bits per block here, 3.0 progressive; the bound is 1) loads, with its pixels."""
    from PIL import Image

    from pyvtrim import _ffi

    p = tmp_path / "flat.jpg"
    Image.new("L", (2048, 2048), 77).save(p, quality=5, optimize=True, progressive=progressive)
    blocks = (2048 // 8) ** 2
    assert p.stat().st_size < blocks / 2, p.stat().st_size   # near the bound, not far above it
    ffi, lib = _ffi.get()[:2]
    out = ffi.new("struct vtrim_image **")
    assert lib.vtrim_image_from_file(os.fsencode(p), out) == 0, ffi.string(lib.vtrim_last_error()).decode()
    w, h = ffi.new("int32_t *"), ffi.new("int32_t *")
    assert lib.vtrim_image_size(out[0], w, h) == 0 and (w[0], h[0]) == (2048, 2048)
    lib.vtrim_image_free(out[0])


def test_rle_tga_that_holds_its_pixels_decodes(tmp_path: Path) -> None:
    """The bound is not tighter than the format: Pillow's RLE TGA of a flat image (the best compression there
    is) loads, with its pixels."""
    from PIL import Image

    from pyvtrim import _ffi

    p = tmp_path / "flat.tga"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(p, compression="tga_rle")
    ffi, lib = _ffi.get()[:2]
    out = ffi.new("struct vtrim_image **")
    assert lib.vtrim_image_from_file(os.fsencode(p), out) == 0   # the library itself, not Pillow's fallback
    w, h = ffi.new("int32_t *"), ffi.new("int32_t *")
    try:
        assert lib.vtrim_image_size(out[0], w, h) == 0 and (w[0], h[0]) == (300, 200)
    finally:
        lib.vtrim_image_free(out[0])
    assert p.stat().st_size < 300 * 200 * 3 // 50   # compressed 50x and more: the RLE bound is what it passed
