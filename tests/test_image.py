"""Image input: decoding and preprocessing, against transformers' image processors.

The reference is the checkpoint's own processor, ``AutoImageProcessor.from_pretrained(hf_dir)``: in
transformers 5.23 without torchvision that is the PIL backend (CLIPImageProcessorPil, or
LlavaImageProcessorPil with do_pad=True), which resizes the uint8 image with Pillow. libvtrim reproduces
Pillow's fixed-point resampling and numpy's float steps, so the pixel values are expected to be *equal*.
The tolerance EXACT (1e-6 on normalised values, i.e. 1/4000 of one uint8 level) only leaves room for a
compiler that rounds a float differently; any resampling difference would be >= 1/255/std ~ 0.014.

Pillow 13 changed the order of the two resampling passes for images whose height shrinks much more than
their width (vertical first); libvtrim follows Pillow 13. With an older Pillow those images may differ by
one uint8 level, and the comparisons allow that (ONE_LEVEL).

JPEG: stb_image and libjpeg(-turbo) decode the same file to pixels that differ by a few levels (IDCT and
chroma upsampling), so JPEG input is compared with a tolerance measured for these images (JPEG_TOL).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

PIL_Image = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")

import PIL  # noqa: E402

import pyvtrim  # noqa: E402

EXACT = 1e-6
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13
# One uint8 level after normalisation (the smallest CLIP std is 0.2613).
ONE_LEVEL = 1.0 / 255.0 / 0.26130258 + 1e-6
TOL = EXACT if PILLOW_13 else ONE_LEVEL
# stb_image vs libjpeg-turbo on these images (quality 50-95, 4:4:4/4:2:2/4:2:0): decoded pixels differ by up to
# 5 levels; after preprocessing, measured max 0.015 at 30 px (downscaled) and 0.088 at 336 px (upscaled),
# mean <= 0.0025. The bounds leave a margin and stay far below what a wrong step would give.
JPEG_TOL_MAX, JPEG_TOL_MEAN = 0.15, 0.01

SIZES = [(30, 30), (5, 7), (7, 5), (1, 1), (2, 3), (31, 29), (64, 48), (48, 64), (337, 501),
         (2000, 300), (300, 2000), (100, 3)]


def rand_image(w: int, h: int, seed: int, smooth: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, w)[None, :, None] + np.linspace(-60, 60, h)[:, None, None]
    return (ramp + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)


def encode(img, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h pixels (8-bit RGB) and which holds almost no pixel data."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


class Case:
    """A converted tiny LLaVA and the HF image processor of its checkpoint."""

    def __init__(self, fixture):
        self.model = pyvtrim.Model(str(fixture.gguf))
        self.processor = transformers.AutoImageProcessor.from_pretrained(str(fixture.hf_dir))

    def reference(self, image) -> np.ndarray:
        """pixel_values of the HF processor: (1, 3, S, S) float32."""
        return np.asarray(self.processor(images=image, return_tensors="np")["pixel_values"])

    def compare(self, image, reference_input=None, tol: float = TOL) -> float:
        got = self.model.preprocess(image)
        ref = self.reference(image if reference_input is None else reference_input)
        assert got.dtype == np.float32
        assert got.shape == ref.shape, (got.shape, ref.shape)
        diff = float(np.abs(got - ref).max())
        assert diff <= tol, f"max |diff| {diff} > {tol}"
        return diff


@pytest.fixture(scope="module", params=["clip", "llava_pad", "llava_pad_336"])
def case(request):
    """CLIPImageProcessor at 30 px, LlavaImageProcessor(do_pad=True) at 30 px, and at LLaVA-1.5's 336 px."""
    if request.param == "clip":
        fixture = request.getfixturevalue("llava_tiny")
    elif request.param == "llava_pad":
        fixture = request.getfixturevalue("llava_tiny_pad")
    else:
        make = request.getfixturevalue("tiny_llava_factory")
        fixture = make(n_kv_heads=4, do_pad=True, image_size=336, patch_size=42)
    c = Case(fixture)
    yield c
    c.model.close()


def test_reference_is_the_pil_backend(case):
    # The parity claim is about the PIL backend; a torchvision backend would resize differently.
    assert type(case.processor).__name__.endswith("Pil"), type(case.processor).__name__
    assert case.processor.resample == 3  # BICUBIC, as llava-hf ships it


@pytest.mark.parametrize("smooth", [False, True], ids=["noise", "smooth"])
@pytest.mark.parametrize("w,h", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_arrays_match_hf(case, w, h, smooth):
    a = rand_image(w, h, seed=w * 1000 + h, smooth=smooth)
    # HF is given the PIL image: its numpy path guesses the channel axis and gets (1, 1, 3) wrong.
    case.compare(a, reference_input=PIL_Image.fromarray(a))


def test_output_layout(case):
    side = case.model.info["image_size"]
    out = case.model.preprocess(rand_image(40, 20, seed=1))
    assert out.shape == (1, 3, side, side) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    # Deterministic, and the same for the same pixels whatever the input kind.
    np.testing.assert_array_equal(out, case.model.preprocess(rand_image(40, 20, seed=1)))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "1", "RGBA", "LA", "PA"])
def test_pil_modes_match_hf(case, mode):
    """PIL images are converted as HF converts them: grey replicated, transparency composited on white."""
    rgb = rand_image(45, 33, seed=7, smooth=True)
    alpha = np.random.default_rng(8).integers(0, 256, (33, 45), dtype=np.uint8)
    alpha[:3] = 0
    img = PIL_Image.fromarray(rgb)
    if mode in ("RGBA", "LA", "PA"):
        img = PIL_Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    img = img.convert(mode)
    case.compare(img)


@pytest.mark.parametrize("kind", ["RGB", "L", "RGBA", "LA", "P", "P+transparency", "RGB+transparency", "1bit",
                                  "interlaced"])
def test_png_files_match_hf(case, tmp_path, kind):
    """A PNG file or its bytes, decoded by libvtrim, gives what HF gives for PIL.Image.open of it."""
    rgb = rand_image(51, 37, seed=11, smooth=True)
    alpha = np.random.default_rng(12).integers(0, 256, (37, 51), dtype=np.uint8)
    alpha[0, :10] = 0
    options = {}
    if kind == "RGB":
        img = PIL_Image.fromarray(rgb)
    elif kind == "L":
        img = PIL_Image.fromarray(rgb[..., 0])
    elif kind == "RGBA":
        img = PIL_Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif kind == "LA":
        img = PIL_Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    elif kind == "P":
        img = PIL_Image.fromarray(rgb).quantize(64)
    elif kind == "P+transparency":
        img, options = PIL_Image.fromarray(rgb).quantize(64), {"transparency": 3}
    elif kind == "RGB+transparency":
        img, options = PIL_Image.fromarray(rgb), {"transparency": tuple(int(x) for x in rgb[5, 5])}
    elif kind == "1bit":
        img = PIL_Image.fromarray(rgb[..., 1] > 128)
    else:
        img, options = PIL_Image.fromarray(rgb), {"interlace": 1}  # Pillow may ignore it; harmless
    data = encode(img, "PNG", **options)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    ref_input = PIL_Image.open(io.BytesIO(data))
    case.compare(str(path), reference_input=ref_input)
    case.compare(path, reference_input=ref_input)        # os.PathLike
    case.compare(data, reference_input=ref_input)        # bytes


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TGA", "PPM"])
def test_other_lossless_files_match_hf(case, tmp_path, fmt):
    img = PIL_Image.fromarray(rand_image(29, 41, seed=13, smooth=True))
    if fmt == "GIF":
        img = img.quantize(200)
    data = encode(img, fmt)
    case.compare(data, reference_input=PIL_Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("quality,subsampling,progressive",
                         [(95, 0, False), (75, 2, False), (50, 1, True), (90, 2, True)])
def test_jpeg_files_close_to_hf(case, tmp_path, quality, subsampling, progressive):
    img = PIL_Image.fromarray(rand_image(160, 120, seed=quality, smooth=True))
    data = encode(img, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive)
    path = tmp_path / "image.jpg"
    path.write_bytes(data)
    got = case.model.preprocess(str(path))
    ref = case.reference(PIL_Image.open(io.BytesIO(data)))
    diff = np.abs(got - ref)
    assert float(diff.max()) <= JPEG_TOL_MAX and float(diff.mean()) <= JPEG_TOL_MEAN, (diff.max(), diff.mean())
    np.testing.assert_array_equal(got, case.model.preprocess(data))  # same decoder for a path and bytes


def test_grey_jpeg_close_to_hf(case):
    data = encode(PIL_Image.fromarray(rand_image(64, 64, seed=3, smooth=True)[..., 0]), "JPEG", quality=80)
    diff = np.abs(case.model.preprocess(data) - case.reference(PIL_Image.open(io.BytesIO(data))))
    assert float(diff.max()) <= JPEG_TOL_MAX and float(diff.mean()) <= JPEG_TOL_MEAN


# ---- bad input ------------------------------------------------------------------------------------

def _png_bytes() -> bytes:
    return encode(PIL_Image.fromarray(rand_image(40, 30, seed=5)), "PNG")


def _jpeg_bytes() -> bytes:
    return encode(PIL_Image.fromarray(rand_image(40, 30, seed=5, smooth=True)), "JPEG")


BAD_FILES = {
    "empty": lambda: b"",
    "text": lambda: b"this is not an image, only some text\n" * 4,
    "zeros": lambda: b"\0" * 256,
    "random bytes": lambda: np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
    "png signature only": lambda: _png_bytes()[:8],
    "png truncated": lambda: _png_bytes()[: len(_png_bytes()) * 2 // 3],
    "png bad crc": lambda: _png_bytes()[:60] + b"\x55" * 16 + _png_bytes()[76:],
    "jpeg truncated": lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2],
    "jpeg header only": lambda: _jpeg_bytes()[:40],
    "png 0 x 10": lambda: png_with_header(0, 10),
    "png 60000 x 60000": lambda: png_with_header(60000, 60000),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_raise(llava_tiny, tmp_path, name):
    data = BAD_FILES[name]()
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pyvtrim.Model(str(llava_tiny.gguf)) as m:
        for image in (str(path), data):
            with pytest.raises(pyvtrim.VtrimError) as err:
                m.preprocess(image)
            assert str(err.value), "the error carries a message"
        # The model is still usable after a failed image.
        assert m.preprocess(rand_image(8, 8, seed=0)).shape[0] == 1


def test_missing_file_raises_file_not_found(llava_tiny, tmp_path):
    with pyvtrim.Model(str(llava_tiny.gguf)) as m:
        with pytest.raises(FileNotFoundError):
            m.preprocess(str(tmp_path / "no-such-image.png"))
        with pytest.raises(pyvtrim.VtrimError):  # a directory is not an image
            m.preprocess(str(tmp_path))


@pytest.mark.parametrize("shape,dtype", [((0, 5, 3), np.uint8), ((5, 0, 3), np.uint8), ((0, 0, 3), np.uint8),
                                         ((4, 4, 3), np.float32), ((4, 4, 3), np.int64)],
                         ids=["0-high", "0-wide", "empty", "float32", "int64"])
def test_bad_arrays_raise_value_error(llava_tiny, shape, dtype):
    with pyvtrim.Model(str(llava_tiny.gguf)) as m:
        with pytest.raises(ValueError):
            m.preprocess(np.zeros(shape, dtype=dtype))
