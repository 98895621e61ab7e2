"""Turning Python images into native vtrim_image handles.

An image is one of:
  * a path (str or os.PathLike): decoded by libvtrim (JPEG, PNG, BMP, GIF, TGA, PNM);
    a file libvtrim cannot decode (WebP, TIFF, ...) is decoded by Pillow when Pillow can
  * bytes / bytearray / memoryview: an encoded file in memory, decoded the same way
  * a PIL.Image.Image: converted to RGB here, its pixels copied
  * a numpy uint8 array of shape (H, W, 3): RGB pixels, copied
Native handles are always freed, also when a later image of the same call fails to load.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _ffi
from .errors import VtrimImageError, check, file_not_found

if TYPE_CHECKING:
    import PIL.Image

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, "PIL.Image.Image"]


def is_image(obj: Any) -> bool:
    """Whether obj is one image (as opposed to a sequence of images)."""
    return isinstance(obj, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)) or _is_pil(obj)


def as_image_list(images: Union[ImageLike, Sequence[ImageLike], None]) -> List[ImageLike]:
    """A list of images from None, one image, or a sequence of them."""
    if images is None:
        return []
    if is_image(images):
        return [images]  # type: ignore[list-item]
    return list(images)  # type: ignore[arg-type]


def _is_pil(obj: Any) -> bool:
    return any(cls.__module__.startswith("PIL.") and cls.__name__ == "Image" for cls in type(obj).__mro__)


def _to_rgb(image: Any) -> Any:
    """RGB as HF's image processors make it: transparency composited onto white, not dropped."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        from PIL import Image

        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def pixels_of(image: Any) -> np.ndarray:
    """A C-contiguous uint8 (H, W, 3) array of a PIL image or a numpy array."""
    if _is_pil(image):
        image = np.asarray(_to_rgb(image))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"not an image: {type(image).__name__}")
    if image.dtype != np.uint8:
        raise VtrimImageError(f"image arrays must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise VtrimImageError(f"image arrays must have shape (height, width, 3), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise VtrimImageError(f"empty image: shape {image.shape}")
    return np.ascontiguousarray(image)


# Pillow's names of the formats libvtrim decodes itself: a file of these that libvtrim rejects (damaged,
# oversized) stays rejected rather than being handed to a more lenient decoder.
NATIVE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "TGA", "PPM"})


def pillow_pixels(source: Any) -> Optional[np.ndarray]:
    """The RGB pixels of an encoded image (a path or a binary file object) in a format libvtrim does not
    decode (WebP, TIFF, ...), as Pillow decodes it (the first frame of an animation); None when Pillow
    cannot read it or when it is one of libvtrim's own formats."""
    try:
        from PIL import Image
    except ImportError:  # Pillow is a dependency, but the C decoder alone still serves its formats
        return None
    try:
        with Image.open(source) as im:
            if im.format in NATIVE_FORMATS:
                return None
            im.load()
            return pixels_of(im)
    except Exception:  # whatever Pillow cannot decode (OSError, DecompressionBombError, ...): libvtrim's error stands
        return None


def _from_pixels(ffi: Any, lib: Any, pixels: np.ndarray, out: Any) -> None:
    h, w = int(pixels.shape[0]), int(pixels.shape[1])
    check(lib.vtrim_image_from_pixels(ffi.from_buffer("uint8_t[]", pixels), w, h, out))


def load(image: ImageLike) -> Any:
    """A new native `struct vtrim_image *` the caller must free with vtrim_image_free."""
    ffi, lib = _ffi.get()[:2]
    out = ffi.new("struct vtrim_image **")
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        # libvtrim first (the formats it lists, decoded the same way in C and Python); what it cannot
        # decode goes to Pillow, and only when Pillow cannot either is libvtrim's error raised.
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if not os.path.exists(path):
                raise file_not_found(path)
            source: Any = path
            rc = lib.vtrim_image_from_file(os.fsencode(path), out)
        else:
            data = bytes(image)
            if not data:
                raise VtrimImageError("empty image data")
            source, path = io.BytesIO(data), None
            rc = lib.vtrim_image_from_memory(ffi.from_buffer("uint8_t[]", data), len(data), out)
        if rc < 0:
            try:
                check(rc, path)
            except VtrimImageError:
                pixels = pillow_pixels(source)
                if pixels is None:
                    raise
                _from_pixels(ffi, lib, pixels, out)
    else:
        _from_pixels(ffi, lib, pixels_of(image), out)
    return out[0]


@contextlib.contextmanager
def native_images(images: Sequence[ImageLike]) -> Iterator[Any]:
    """Yields a `struct vtrim_image *[]` of the loaded images (NULL when there are none); frees them after."""
    ffi, lib = _ffi.get()[:2]
    handles: List[Any] = []
    try:
        for image in images:
            handles.append(load(image))
        yield ffi.new("struct vtrim_image *[]", handles) if handles else ffi.NULL
    finally:
        for h in handles:
            lib.vtrim_image_free(h)
