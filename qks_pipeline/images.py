"""Robust image loading for stage one: every readable image becomes RGB, every unreadable one a short reason.

Conversions (what the reference's `Image.open(p).convert("RGB")` gets wrong is fixed, the rest kept):
- grayscale (L, 1), CMYK, YCbCr, LAB, HSV and palette images without transparency: PIL's own conversion to RGB;
- images with transparency (RGBA, LA, PA, palette with a transparent colour): alpha-composited **on white**; a plain
  convert would expose whatever colour the transparent pixels hold (often black);
- 16-bit and 32-bit integer grayscale (I;16*, I): scaled by 1/257 to 8 bits; a plain convert clips them (mostly white);
- float images (F): taken as [0, 1] when their maximum is <= 1, else as [0, 255].
EXIF orientation is not applied, as in the reference and in CLIP's preprocessing.

Unreadable files (missing, empty, truncated, corrupt, decompression bombs) raise `BadImage` with a one-line reason;
the extraction records them and masks them out.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
AUG_SCALE = (0.5, 1.0)  # random-resized-crop area range of the augmented views (a multi-label image keeps most labels)
AUG_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the crop


class BadImage(Exception):
    """An image that cannot be used; `reason` is one short line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _deep_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit RGB, scaled rather than clipped."""
    x = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        x = x * 255.0 if np.nanmax(x, initial=0.0) <= 1.0 else x
    else:
        x = x / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.nan_to_num(x), 0, 255).round().astype(np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (see the module docstring for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img)
    if img.mode.startswith("I") or img.mode == "F":
        return _deep_to_rgb(img)
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully and return it as RGB.

    Raises:
        BadImage: the file is missing, empty, truncated, corrupt or a decompression bomb.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
    except FileNotFoundError:
        raise BadImage("missing") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte or an unpaired surrogate in the name
        raise BadImage(f"unreadable ({getattr(e, 'strerror', None) or e})") from None
    if not path.is_file():
        raise BadImage("not a file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                img.load()  # decode now: truncation and corruption surface here, not later in a worker
                return to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(f"decompression bomb ({str(e).split('(')[0].strip()})") from None
        except Image.UnidentifiedImageError:
            raise BadImage("not a readable image format") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError... for broken files
            text = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            kind = "truncated" if "truncated" in text else "corrupt"
            raise BadImage(f"{kind} ({text})") from None


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = AUG_SCALE
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop, as torchvision's RandomResizedCrop draws it, from a seeded generator."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(np.log(AUG_RATIO[0]), np.log(AUG_RATIO[1])))
        w, h = round(np.sqrt(target * ratio)), round(np.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(width, height)  # fallback: the central square
    return (height - side) // 2, (width - side) // 2, side, side


def augmented_view(
    img: Image.Image, rng: np.random.Generator, size: tuple[int, int], mean, std, interpolation: str
) -> torch.Tensor:
    """One augmented view: random resized crop + horizontal flip (p 0.5), then CLIP normalisation -> (3, H, W)."""
    top, left, h, w = random_resized_crop_box(img.width, img.height, rng)
    mode = TF.InterpolationMode(interpolation)
    view = TF.resized_crop(img, top, left, h, w, list(size), interpolation=mode, antialias=True)
    if rng.random() < 0.5:
        view = TF.hflip(view)
    return TF.normalize(TF.to_tensor(view), mean, std)
