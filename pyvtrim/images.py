"""Turning Python images into native vtrim_image handles.

An image is one of:
  * a path (str or os.PathLike): decoded by libvtrim (JPEG, PNG, BMP, GIF, TGA, PNM)
  * bytes / bytearray / memoryview: an encoded file in memory, decoded by libvtrim
  * a PIL.Image.Image: converted to RGB here, its pixels copied
  * a numpy uint8 array of shape (H, W, 3): RGB pixels, copied
Native handles are always freed, also when a later image of the same call fails to load.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator, List, Sequence, Union

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


def load(image: ImageLike) -> Any:
    """A new native `struct vtrim_image *` the caller must free with vtrim_image_free."""
    ffi, lib = _ffi.get()[:2]
    out = ffi.new("struct vtrim_image **")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise file_not_found(path)
        check(lib.vtrim_image_from_file(os.fsencode(path), out), path)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise VtrimImageError("empty image data")
        check(lib.vtrim_image_from_memory(ffi.from_buffer("uint8_t[]", data), len(data), out))
    else:
        pixels = pixels_of(image)
        h, w = int(pixels.shape[0]), int(pixels.shape[1])
        check(lib.vtrim_image_from_pixels(ffi.from_buffer("uint8_t[]", pixels), w, h, out))
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
