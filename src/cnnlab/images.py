"""Decoding one image (a file or uploaded bytes) into the pixels a model expects, safely.

No PyTorch here: a deployment that serves an ONNX model decodes images with Pillow and NumPy only.
The pixel count is checked from the header, before any pixel is decoded, so that a small file that
expands to gigabytes (a decompression bomb) is refused instead of exhausting memory.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import CnnlabError

# 4096 x 4096: far above any photo a 32x32 classifier needs, far below what would exhaust memory.
MAX_PIXELS = 16_777_216


class ImageError(CnnlabError):
    """An image that cannot be used; `status` is the HTTP status the server answers with."""

    status = 400


class NotAnImage(ImageError):
    status = 415  # Unsupported Media Type: Pillow recognises no image format in the bytes


class TooManyPixels(ImageError):
    status = 413  # Content Too Large: the decoded image would be too big


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def decode_image(source: bytes | str | os.PathLike, channels: int | None, size: tuple[int, int] | None,
                 max_pixels: int = MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """A uint8 (H, W, C) array with the model's channel count (1 or 3) and size (H, W).

    `channels=None` keeps grayscale images grey and makes everything else RGB; `size=None` keeps the size.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "upload")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x its own limit, raises) about large images; ours is the limit that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise TooManyPixels(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}")
                gray = channels == 1 if channels is not None else im.mode in GRAY_MODES
                im = im.convert("L" if gray else "RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except FileNotFoundError:
        raise CnnlabError(f"image {name} does not exist") from None
    except IsADirectoryError:
        raise CnnlabError(f"{name} is a folder, not an image") from None
    except UnidentifiedImageError:
        raise NotAnImage(f"{name} is not an image Pillow can read (PNG, JPEG, BMP, WebP, GIF, ...)") from None
    except Image.DecompressionBombError as e:
        raise TooManyPixels(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt image data
        raise ImageError(f"cannot decode image {name}: {e}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr
