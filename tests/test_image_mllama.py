"""Llama-3.2-Vision image preprocessing (core/src/image/image_mllama.c) against transformers' MllamaImageProcessorPil,
through the Python API on a converted tiny mllama: Model.preprocess(image) -> float32 [max_image_tiles, 3, S, S]
and Model.preprocess_info(image) -> {"aspect_ratio_id", "aspect_ratio_mask", "n_tiles"}.

The resize is Pillow's on uint8 pixels, reproduced bit for bit, and the float steps round as numpy does, so
pixels must be EQUAL (no tolerance). The sizes cover every branch of HF's canvas choice: images smaller than
one tile (even 1x1: enlarged to a full tile), the least enlargement among several canvases, ties broken by
area, images larger than every canvas (the least reduction), extreme aspect ratios whose short side floors
to 1 pixel, and zero padding (normalised: -mean/std) at the bottom and right."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

import pyvtrim
from pyvtrim import _ffi

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:  # the C library is not built: nothing here can run
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

if not hasattr(pyvtrim.Model, "preprocess_info"):
    pytest.skip("pyvtrim.Model.preprocess_info is not implemented yet", allow_module_level=True)

FIXTURES = ["mllama_tiny", "mllama_tiny_b"]  # tiles of 28 and 56 pixels (tests/fixtures_mllama.py)


@pytest.fixture(scope="module", params=FIXTURES)
def tiny(request):
    try:
        return request.getfixturevalue(request.param)
    except pytest.FixtureLookupError:
        pytest.skip(f"fixture {request.param} is not defined (tests/conftest.py)")


@pytest.fixture(scope="module")
def model(tiny):
    with pyvtrim.Model(str(tiny.gguf), n_ctx=256, kv_type="f32", n_threads=2) as m:
        yield m


@pytest.fixture(scope="module")
def hf_processor(tiny):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil.from_pretrained(str(tiny.hf_dir))


def _hf(processor, image) -> dict:
    """pixel_values [max_image_tiles, 3, S, S] and the tile metadata for one image, as the runtime reports them."""
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    r = processor(images=[[pil]], return_tensors="np")
    return dict(pixels=r["pixel_values"][0, 0], aspect_ratio_id=int(r["aspect_ratio_ids"][0, 0]),
                aspect_ratio_mask=[int(v) for v in r["aspect_ratio_mask"][0, 0]], n_tiles=int(r["num_tiles"][0][0]))


def _sizes(S: int, M: int) -> list:
    """(width, height) pairs: every canvas choice for tiles of S pixels, at most M of them."""
    fixed = [
        (1, 1), (1, 2), (2, 1), (S // 2 - 1, S // 2 + 1),             # smaller than a tile (and than a patch)
        (S, S), (S - 1, S), (S + 1, S), (S + 1, S + 1),                # around one tile
        (S, S // 2), (S // 2, S),                                      # one tile, half of it padding
        (2 * S, S), (S, 2 * S), (2 * S + 1, S - 3), (3 * S // 2, S),   # wide and tall canvases
        (5, 300), (300, 5), (3000, 200), (200, 3000),                  # extreme ratios, the short side floors
        (1, 2000), (2000, 1), (M * S + 7, M * S + 3), (4000, 3000),    # larger than every canvas
    ]
    rng = np.random.default_rng(S * 100 + M)
    rand = [(int(rng.integers(1, top + 1)), int(rng.integers(1, top + 1)))
            for top in (S, 2 * S, 3 * S, 5 * S) for _ in range(4)]
    return fixed + rand


def _image(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_matches_hf_pixel_for_pixel(model, hf_processor) -> None:
    S, M = hf_processor.size.height, hf_processor.max_image_tiles
    for i, (w, h) in enumerate(_sizes(S, M)):
        image = _image(w, h, i)
        ref = _hf(hf_processor, image)
        px = model.preprocess(image)
        info = model.preprocess_info(image)
        where = f"{w} x {h} image, {S}-pixel tiles, at most {M}"
        assert px.dtype == np.float32 and px.shape == ref["pixels"].shape == (M, 3, S, S), where
        np.testing.assert_array_equal(px, ref["pixels"], err_msg=where)
        assert info["n_tiles"] == ref["n_tiles"], where
        assert info["aspect_ratio_id"] == ref["aspect_ratio_id"], where
        assert list(info["aspect_ratio_mask"]) == ref["aspect_ratio_mask"], where


def test_tile_layout(model, hf_processor) -> None:
    """Canvas choice, tile order and padding, checked without HF: a wide image fills a row of tiles, the tile axis
    is padded with raw zeros, the canvas below the image with normalised zeros."""
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    S, M = hf_processor.size.height, hf_processor.max_image_tiles
    mean = np.array(hf_processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.array(hf_processor.image_std, dtype=np.float32)[:, None, None]
    ratios = get_all_supported_aspect_ratios(M)
    if M < 2:
        pytest.skip("one tile at most")

    # 2S x S: the canvas is one tile down, two across, the image exactly fills it.
    image = np.zeros((S, 2 * S, 3), dtype=np.uint8)
    image[:, :S] = 40
    image[:, S:] = 200
    info = model.preprocess_info(image)
    px = model.preprocess(image)
    assert info["n_tiles"] == 2
    assert ratios[info["aspect_ratio_id"] - 1] == (1, 2)
    assert list(info["aspect_ratio_mask"]) == [1, 1] + [0] * (M - 2)
    for tile, level in ((0, 40), (1, 200)):  # left tile first
        expected = (np.float32(level / 255) - mean) / std
        np.testing.assert_allclose(px[tile], np.broadcast_to(expected, (3, S, S)), rtol=0, atol=1e-6)
    assert not px[2:].any(), "padding tiles must be raw zeros"

    # S x S/2 (w x h): one tile, the image resized to S x S/2 at the top, the bottom half padding (-mean/std).
    image = np.full((S // 2, S, 3), 100, dtype=np.uint8)
    info = model.preprocess_info(image)
    px = model.preprocess(image)
    assert info["n_tiles"] == 1 and info["aspect_ratio_id"] == 1
    assert list(info["aspect_ratio_mask"]) == [1] + [0] * (M - 1)
    top = (np.float32(100 / 255) - mean) / std
    np.testing.assert_allclose(px[0, :, : S // 2], np.broadcast_to(top, (3, S // 2, S)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(px[0, :, S // 2:], np.broadcast_to(-mean / std, (3, S - S // 2, S)), rtol=0,
                               atol=1e-6)
    assert not px[1:].any()


def test_tiny_and_huge_images(model, hf_processor) -> None:
    """A 1x1 image becomes one full tile; a very large one is reduced to fit the largest canvas (never refused
    for its size below the decoder's limits)."""
    S, M = hf_processor.size.height, hf_processor.max_image_tiles
    one = model.preprocess_info(np.array([[[9, 99, 199]]], dtype=np.uint8))
    assert one["n_tiles"] == 1 and one["aspect_ratio_id"] == 1
    huge = _image(6000, 4000, 0)
    info = model.preprocess_info(huge)
    assert 1 <= info["n_tiles"] <= M
    np.testing.assert_array_equal(model.preprocess(huge), _hf(hf_processor, huge)["pixels"])


def test_other_image_kinds(model, hf_processor, tmp_path: Path) -> None:
    """Files, encoded bytes, PIL images in other modes: converted to RGB as HF's do_convert_rgb does."""
    from PIL import Image

    S = hf_processor.size.height
    rgb = _image(3 * S // 2 + 5, S - 7, 21)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    path = tmp_path / "wide.png"
    path.write_bytes(png.getvalue())
    ref = _hf(hf_processor, rgb)["pixels"]
    for image in (str(path), path, png.getvalue(), Image.fromarray(rgb)):
        np.testing.assert_array_equal(model.preprocess(image), ref, err_msg=repr(type(image)))
    gray = Image.fromarray(rgb).convert("L")
    np.testing.assert_array_equal(model.preprocess(gray), _hf(hf_processor, gray)["pixels"])


def test_info_matches_pixels(model, hf_processor) -> None:
    """n_tiles, the mask and the zero padding tiles agree with each other for every canvas."""
    S, M = hf_processor.size.height, hf_processor.max_image_tiles
    for i, (w, h) in enumerate(_sizes(S, M)[:12]):
        image = _image(w, h, 100 + i)
        info, px = model.preprocess_info(image), model.preprocess(image)
        n = info["n_tiles"]
        assert list(info["aspect_ratio_mask"]) == [1] * n + [0] * (M - n)
        assert not px[n:].any() and np.isfinite(px).all()


def test_bad_images(model) -> None:
    for bad in (np.zeros((0, 5, 3), dtype=np.uint8), b"not an image at all"):
        with pytest.raises(pyvtrim.VtrimError):
            model.preprocess(bad)
        with pytest.raises(pyvtrim.VtrimError):
            model.preprocess_info(bad)
    assert model.preprocess(np.zeros((3, 3, 3), dtype=np.uint8)).shape[0] >= 1  # still usable
