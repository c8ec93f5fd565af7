"""Decode a base-corpus image the one way every part of the pipeline does.

``decode_image(bytes) -> PIL RGB`` is the single decode path for everything that feeds
pixels to a model or replays stored augmentation params on a base image: the shard worker
(``prepare``), ``dr add-teacher`` and the ``dr inspect`` contact sheet. It

* refuses empty bytes (``empty_image``), formats outside ``ALLOWED_FORMATS`` and corrupt or
  truncated data (``undecodable``); PIL's plugins for PostScript/EPS and friends are never
  tried, so no external interpreter runs on corpus bytes;
* checks the size the header *declares* before decoding a single pixel (``too_large``), so a
  decompression bomb (a tiny file declaring 30000x30000 pixels) costs no memory;
* converts every mode to 8-bit RGB: CMYK/YCbCr/L/1/P -> RGB; transparency (RGBA, LA, PA, P
  with a transparent colour) is composited on white; 16/32-bit grayscale (I;16*, I) is
  scaled to 8 bit (``>> 8``) instead of being clipped to white; float (F) is clipped to 0..255.

EXIF orientation is deliberately *not* applied: stored augmentation params (crop boxes)
are relative to the pixels as stored, which is what every trainer decodes (this project's
and MobileCLIP's DataCompDR loader both open the bytes with plain PIL). Rotating here would
make the teachers see a view the student never sees. See docs/bad-data.md.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 64_000_000  # declared width x height above this -> too_large
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO
_WHITE = (255, 255, 255)


class ImageRejected(ValueError):
    """The bytes are not a usable image; ``reason`` is the rejection reason for the stats."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def open_checked(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open lazily (header only) and check the declared size; raises ``ImageRejected``."""
    if not data:
        raise ImageRejected("empty_image", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:  # PIL's own guard (> 2x its limit) fires at open
        raise ImageRejected("too_large", str(e)[:200]) from None
    except UnidentifiedImageError:
        raise ImageRejected(
            "undecodable", f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt headers
        raise ImageRejected("undecodable", f"{type(e).__name__}: {e}"[:200]) from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageRejected("undecodable", f"declares {w}x{h} pixels")
    if w * h > max_pixels:
        raise ImageRejected("too_large", f"declares {w}x{h} pixels (limit {max_pixels})")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (transparency on white, 16-bit scaled to 8-bit)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img)
        if a.dtype.itemsize > 2 or a.dtype.kind != "u":  # "I" is int32: clip to the 16-bit range
            a = np.clip(a, 0, 65535)
        a = (a >> 8).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P, RGBX, LAB, HSV, ...


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes -> fully loaded 8-bit RGB PIL image. Raises ``ImageRejected(reason, detail)``."""
    img = open_checked(data, max_pixels)
    try:
        img.load()
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_large", str(e)[:200]) from None
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data surfaces here
        raise ImageRejected("undecodable", f"{type(e).__name__}: {e}"[:200]) from None


__all__ = ["decode_image", "open_checked", "to_rgb", "ImageRejected", "MAX_IMAGE_PIXELS", "ALLOWED_FORMATS"]
