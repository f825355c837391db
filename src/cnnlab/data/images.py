"""Decoding one image (a file or uploaded bytes) into the pixels a model expects, safely.

No PyTorch here: a deployment that serves an ONNX model decodes images with Pillow and NumPy only.
The pixel count is checked from the header, before any pixel is decoded, so that a small file that
expands to gigabytes (a decompression bomb) is refused instead of exhausting memory.

Every format ends up as uint8 grey or RGB the way a viewer shows it: the EXIF orientation is applied,
transparency is laid over white, CMYK and palettes become RGB, 16-bit channels keep their top 8 bits
(Pillow's own conversion clips them, which turns most 16-bit greyscale PNGs white), and an animated GIF
gives its first frame. HEIC/HEIF come through the optional pillow-heif package (`cnnlab[heif]`).

`resize` is one of fastai's three methods for reaching a fixed (H, W):
- crop: scale so the image covers (H, W), then cut the centre (no distortion, loses the edges);
- pad: scale so the image fits inside (H, W), then pad with black (no distortion, keeps everything);
- squish: scale each side independently (keeps everything, distorts the aspect ratio).
A large JPEG is decoded directly at 1/2, 1/4 or 1/8 scale when the target is that small (draft mode).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnlab import files
from cnnlab.errors import CnnlabError

Resize = Literal["crop", "pad", "squish"]
RESIZE_METHODS = ("crop", "pad", "squish")

# 4096 x 4096 by default: far above what a classifier's input needs, far below what would exhaust memory.
MAX_PIXELS = 16_777_216


class ImageError(CnnlabError):
    """An image that cannot be used; `status` is the HTTP status the server answers with."""

    status = 400


class NotAnImage(ImageError):
    status = 415  # Unsupported Media Type: Pillow recognises no image format in the bytes


class TooManyPixels(ImageError):
    status = 413  # Content Too Large: the decoded image would be too big


GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
HEIF_EXTENSIONS = (".heic", ".heif")


def _register_heif() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


HAVE_HEIF = _register_heif()


def _to_8bit(im: Image.Image, gray: bool) -> Image.Image:
    """Grey ("L") or RGB, with alpha over white and 16-bit or float values scaled rather than clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        shift = 8 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 0  # "I" may hold 8 or 16 bits
        im = Image.fromarray((np.clip(arr, 0, 65535).astype(np.uint32) >> shift).astype(np.uint8))
    elif im.mode == "F":
        arr = np.asarray(im)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0  # floats in [0, 1] or already in [0, 255]
        im = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("L" if gray else "RGB")


def fit_size(width: int, height: int, size: tuple[int, int], resize: Resize) -> tuple[int, int]:
    """The (width, height) to scale an image to before cropping or padding it to `size` (H, W)."""
    th, tw = size
    if resize == "squish":
        return tw, th
    scale = (max if resize == "crop" else min)(tw / width, th / height)
    return max(tw if resize == "crop" else 1, round(width * scale)), max(th if resize == "crop" else 1,
                                                                        round(height * scale))


def resize_to(im: Image.Image, size: tuple[int, int], resize: Resize) -> Image.Image:
    """`im` at exactly `size` (H, W) by the given method (antialiased bilinear scaling)."""
    th, tw = size
    if im.size == (tw, th):
        return im
    w, h = fit_size(*im.size, size, resize)
    if resize == "crop" and w * h > 16 * tw * th:
        # an extreme aspect ratio: scaling the whole image to cover the target, then cropping, would make a huge
        # intermediate (a 1,000,000x1 PNG: 25.6 s and 5.3 GB). The centre region with the target's aspect is
        # scaled straight to the target instead. Other images keep the scale-then-crop path, pixel for pixel.
        scale = max(tw / im.width, th / im.height)
        bw, bh = tw / scale, th / scale
        left, top = (im.width - bw) / 2, (im.height - bh) / 2
        return im.resize((tw, th), Image.BILINEAR, box=(left, top, left + bw, top + bh))
    if (w, h) != im.size:
        im = im.resize((w, h), Image.BILINEAR)
    if resize == "crop":
        left, top = (w - tw) // 2, (h - th) // 2
        return im.crop((left, top, left + tw, top + th))
    if resize == "pad":
        canvas = Image.new(im.mode, (tw, th))
        canvas.paste(im, ((tw - w) // 2, (th - h) // 2))
        return canvas
    return im


def _turned(im: Image.Image) -> bool:
    """Whether the EXIF orientation turns the image by 90 degrees to show it (orientations 5-8)."""
    return im.getexif().get(0x0112, 1) >= 5


def _draft(im: Image.Image, size: tuple[int, int], resize: Resize) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when that still leaves at least the pixels needed."""
    if im.format != "JPEG":
        return
    th, tw = size if not _turned(im) else size[::-1]
    w, h = fit_size(*im.size, (th, tw), resize)
    im.draft(im.mode if im.mode in ("L", "RGB") else None, (w, h))


def decode_image(source: bytes | str | os.PathLike, channels: int | None, size: tuple[int, int] | None,
                 max_pixels: int = MAX_PIXELS, name: str | None = None, resize: Resize = "crop",
                 facts: dict | None = None) -> np.ndarray:
    """A uint8 (H, W, C) array with the model's channel count (1 or 3) and size (H, W).

    `channels=None` keeps grayscale images grey and makes everything else RGB; `size=None` keeps the size.
    `facts`, when given, receives what the file itself is (`file_facts`), for `cnnlab data info`.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "upload")
    try:
        return _decode(source, channels, size, max_pixels, name, resize, facts)
    except ImageError:
        raise
    except FileNotFoundError:
        raise CnnlabError(f"image {name} does not exist") from None
    except IsADirectoryError:
        raise CnnlabError(f"{name} is a folder, not an image") from None
    except UnidentifiedImageError:
        if str(name).lower().endswith(HEIF_EXTENSIONS) and not HAVE_HEIF:
            raise NotAnImage(f"{name}: HEIC/HEIF images need pillow-heif: pip install 'cnnlab[heif]'") from None
        raise NotAnImage(f"{name} is not an image Pillow can read (JPEG, PNG, GIF, BMP, TIFF, WebP, AVIF, "
                         f"HEIC with cnnlab[heif])") from None
    except Image.DecompressionBombError as e:
        raise TooManyPixels(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt image data
        raise ImageError(f"cannot decode image {name}: {e}") from None


def file_facts(im: Image.Image) -> dict:
    """The file as it is on disk: its format, its width and height as shown (EXIF orientation applied),
    whether EXIF turns or mirrors it, and whether it has transparency (which decoding puts over white)."""
    w, h = im.size
    return {"format": im.format or "?", "size": (h, w) if _turned(im) else (w, h),
            "exif_rotated": im.getexif().get(0x0112, 1) not in (0, 1),
            "transparent": im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info}


def _decode(source, channels, size, max_pixels, name, resize, facts=None) -> np.ndarray:
    # reading a FIFO waits for a writer; a device may never end (a missing file or a folder: open() says so)
    if not isinstance(source, bytes) and files.special_kind(source) not in (None, "folder"):
        raise NotAnImage(f"{name} is not a regular file (a FIFO, device or socket), not an image")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        # Pillow warns (and past 2x its own limit, raises) about large images; ours is the limit that counts.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(stream) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise TooManyPixels(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}")
            gray = channels == 1 if channels is not None else im.mode in GRAY_MODES
            if facts is not None:
                facts.update(file_facts(im))
            if size is not None:
                _draft(im, size, resize)
            ImageOps.exif_transpose(im, in_place=True)  # a photo taken sideways shows upright, as in any viewer
            # (in place: otherwise Pillow copies every image, turned or not)
            im = _to_8bit(im, gray)
            if size is not None:
                im = resize_to(im, size, resize)
            arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) as shown (EXIF orientation applied), from the header alone."""
    with Image.open(path) as im:
        w, h = im.size
        return (w, h) if _turned(im) else (h, w)


def detail_lost(pixels: np.ndarray, side: int) -> float:
    """What a round trip through `side` x `side` pixels takes from an (H, W, C) uint8 image: the root mean square
    of the change over the image's own standard deviation. About 0.02 for an image enlarged from a smaller one
    (CIFAR-10's 32 px at 128 through 96), 0.1-0.5 for a photo with detail at its size (scikit-image's samples
    at 128 through 96: median 0.15)."""
    h, w = pixels.shape[:2]
    im = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
    back = np.asarray(im.resize((side, side), Image.BILINEAR).resize((w, h), Image.BILINEAR), np.float32)
    x = pixels.astype(np.float32).reshape(back.shape)
    return float(np.sqrt(np.mean((x - back) ** 2)) / max(float(x.std()), 1e-6))
