"""Robust image loading for stage one.

Every readable image becomes RGB (the conversions, and where they differ from the authors'
`convert("RGB")`: docs/design.md, section 4); every unreadable one raises `BadImage` with a short
reason, which extraction records while masking the image out.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image


class BadImage(Exception):
    """An image that cannot be used; `reason` is one short line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB by the rules of docs/design.md, section 4."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if has_alpha or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        # transparent pixels go on white
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img.convert("RGB")
    # 16/32-bit integer or float grayscale: scaled, not clipped
    x = np.asarray(img, dtype=np.float64)
    if img.mode != "F":
        x = x / 257.0  # 65535 -> 255
    elif np.nanmax(x, initial=0.0) <= 1.0:
        x = x * 255.0
    gray = np.clip(np.nan_to_num(x), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def load_rgb(
    path: str | Path,
    max_pixels: int | None = None,
    limit_option: str = "--set extract.max_pixels=N",
) -> Image.Image:
    """Decode an image file fully and return it as RGB.

    Raises BadImage when it is missing, empty, truncated, corrupt or larger than `max_pixels`,
    Pillow's decompression-bomb limit for this process (`extract.max_pixels`; None: as is).
    `limit_option` is how the caller's command raises that limit, named in the reason.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
    except FileNotFoundError:
        raise BadImage("missing") from None
    # ValueError: a NUL byte or an unpaired surrogate in the name
    except (OSError, ValueError) as e:
        raise BadImage(f"unreadable ({getattr(e, 'strerror', None) or e})") from None
    if not path.is_file():
        raise BadImage("not a file")
    if max_pixels is not None:
        # the same value in every thread: set where decoding happens (workers)
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                # decode now: truncation and corruption surface here, not later in a worker
                img.load()
                return to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # Pillow names the size (and twice the limit for an error)
            match = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(match[1]):,} pixels" if match else str(e)
            limit = f"the limit of {Image.MAX_IMAGE_PIXELS:,}"
            raise BadImage(
                f"decompression bomb: {size}, above {limit} (raise it with {limit_option})"
            ) from None
        except Image.UnidentifiedImageError:
            raise BadImage("not a readable image format") from None
        # PIL raises OSError, SyntaxError, ValueError, EOFError... for broken files
        except Exception as e:
            text = " ".join(str(e).split()) or type(e).__name__
            kind = "truncated" if "truncated" in text else "corrupt"
            raise BadImage(f"{kind} ({text})") from None
