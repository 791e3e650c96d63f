"""Opening image files that someone else made: a pixel cap, and one error type.

Pillow decodes whatever a file claims to be; a small file can claim a gigapixel image
(a "decompression bomb") and exhaust the memory once decoded. :func:`open_image` reads
the header first and refuses an image above ``max_pixels`` with a message naming the
file, the size and the flag that raises the cap; every decoding failure (Pillow raises
many types) becomes one :class:`UnreadableImage` naming the file.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from ..errors import DataError

__all__ = ["DEFAULT_MAX_PIXELS", "UnreadableImage", "ImageTooLarge", "open_image"]

#: Default pixel cap: above the 24-36 megapixels of common cameras, below Pillow's own
#: decompression-bomb warning (89 megapixels). Raise it with ``--max-pixels``.
DEFAULT_MAX_PIXELS = 40_000_000


class UnreadableImage(DataError):
    """An image file that cannot be decoded (the message names it and why)."""


class ImageTooLarge(UnreadableImage):
    """An image above the pixel cap (the message names the flag that raises it)."""


@contextlib.contextmanager
def _pillow_limit(max_pixels: int):
    """Let Pillow open images up to ``max_pixels`` (our cap replaces its bomb check)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    if old is not None and max_pixels > old:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def open_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, flag: str = "--max-pixels"):
    """Open and fully decode an image file (first frame), refusing one above ``max_pixels``.

    Args:
        path: the file.
        max_pixels: largest ``width * height`` accepted (checked from the header,
            before decoding).
        flag: the option named in the message that raises the cap.

    Returns:
        A decoded ``PIL.Image.Image`` independent of the file.

    Raises:
        ImageTooLarge: above the cap.
        UnreadableImage: missing, not an image, truncated or corrupt.
    """
    from PIL import Image

    path = Path(path)
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    try:
        with _pillow_limit(max_pixels), Image.open(path) as im:
            pixels = im.width * im.height
            if pixels > max_pixels:
                raise ImageTooLarge(
                    f"image {path} is {im.width}x{im.height} = {pixels:,} pixels, above the cap of {max_pixels:,} "
                    f"(a guard against decompression bombs); pass {flag} {pixels} if you trust it"
                )
            im.load()  # decoded pixels stay usable after the file is closed
        return im
    except UnreadableImage:
        raise
    except Exception as e:  # Pillow raises many types for bad files (OSError, SyntaxError, ValueError...)
        raise UnreadableImage(f"cannot read image {path}: {type(e).__name__}: {e}") from e
