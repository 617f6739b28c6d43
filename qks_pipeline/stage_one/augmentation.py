"""Augmented views for `extract.views` > 0, drawn from `extract.augment`.

`reference` (default) is the authors' training transform; `crop_flip` a random resized crop and a
horizontal flip. What each draws, and why RandAugment is written out here: docs/design.md,
section 1. Every draw comes from one numpy Generator, so a view is fixed by its seed.
"""

from __future__ import annotations

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps

AUGMENTS = ("reference", "crop_flip")
# the reference's CutoutPIL(cutout_factor=0.5): side of the rectangle / side of the image
CUTOUT_FACTOR = 0.5
# crop_flip's ranges of area and aspect ratio (most labels stay)
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FILL = (128, 128, 128)  # RandAugment's fill of uncovered pixels
# RandAugment's PIL enhancers
ENHANCE = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Sharpness": ImageEnhance.Sharpness,
    "Brightness": ImageEnhance.Brightness,
}
# each operation's magnitude at indices 0-9, as RandAugment tabulates them (0 is never drawn)
RANGES = {name: np.linspace(0, 0.3, 10) for name in ("ShearX", "ShearY")}
RANGES |= {name: np.linspace(0, 150 / 331, 10) for name in ("TranslateX", "TranslateY")}
RANGES |= {name: np.linspace(0.0, 0.9, 10) for name in ENHANCE}
RANGES |= {"Rotate": np.linspace(0, 30, 10), "Solarize": np.linspace(256, 0, 10)}
RANGES |= {"Posterize": np.round(np.linspace(8, 4, 10)).astype(int)}
RANGES |= {"Cutout": np.round(np.linspace(0, 20, 10)).astype(int)}  # side in pixels
# in the package's order: a draw picks an index into it
OPERATIONS = [
    "Invert",
    "Cutout",
    "Sharpness",
    "AutoContrast",
    "Posterize",
    "ShearX",
    "TranslateX",
    "TranslateY",
    "ShearY",
    "Rotate",
    "Equalize",
    "Contrast",
    "Color",
    "Solarize",
    "Brightness",
]


def fill_box(
    img: Image.Image, left: int, top: int, right: int, bottom: int, colour: tuple[int, ...]
) -> Image.Image:
    """`img` with the pixels [top, bottom) x [left, right) set to `colour`."""
    pixels = np.array(img)
    pixels[top:bottom, left:right] = colour
    return Image.fromarray(pixels)


def cutout(
    img: Image.Image, rng: np.random.Generator, factor: float = CUTOUT_FACTOR
) -> Image.Image:
    """CutoutPIL: a rectangle of `factor` x each side in one uniform random colour.

    The rectangle (+1: PIL's rectangle includes both ends) is centred on a uniform pixel and clipped
    at the border. (The reference names PIL's width `h`; on the square crop it is given, that
    changes nothing.)
    """
    w, h = img.size
    half_w = int(factor * w + 0.5) // 2
    half_h = int(factor * h + 0.5) // 2
    cy = int(rng.integers(h))
    cx = int(rng.integers(w))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    left = max(cx - half_w, 0)
    top = max(cy - half_h, 0)
    return fill_box(img, left, top, cx + half_w + 1, cy + half_h + 1, colour)


def rand_operation(
    img: Image.Image, name: str, magnitude: int, rng: np.random.Generator
) -> Image.Image:
    """One RandAugment operation at magnitude index 1-9; a signed magnitude takes a random sign."""
    v = RANGES.get(name, np.zeros(10))[magnitude]
    sign = float(rng.choice([-1, 1]))
    if name in ENHANCE:
        return ENHANCE[name](img).enhance(1 + v * sign)
    if name.startswith("Shear"):
        matrix = (1, v * sign, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, v * sign, 1, 0)
        return img.transform(
            img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BICUBIC, fillcolor=FILL
        )
    if name.startswith("Translate"):
        # a share of the width (height), in pixels
        shift = v * sign * img.size[name == "TranslateY"]
        matrix = (1, 0, shift, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, shift)
        return img.transform(
            img.size, Image.Transform.AFFINE, matrix, Image.Resampling.NEAREST, fillcolor=FILL
        )
    if name == "Rotate":  # counter-clockwise only, as the package does; the corners get FILL
        rotated = img.convert("RGBA").rotate(v)
        background = Image.new("RGBA", rotated.size, (128,) * 4)
        return Image.composite(rotated, background, rotated).convert(img.mode)
    if name == "Cutout":
        # a gray square of v pixels centred on a uniform pixel, clipped at the border
        cx = int(rng.integers(img.size[0]))
        cy = int(rng.integers(img.size[1]))
        half = v // 2
        gray = (125, 122, 113)
        return fill_box(img, max(cx - half, 0), max(cy - half, 0), cx + half, cy + half, gray)
    if name == "Posterize":
        return ImageOps.posterize(img, int(v))
    if name == "Solarize":
        return ImageOps.solarize(img, v)
    return {
        "Invert": ImageOps.invert,
        "AutoContrast": ImageOps.autocontrast,
        "Equalize": ImageOps.equalize,
    }[name](img)


def rand_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Two (operation, magnitude 1-9) pairs drawn uniformly, each applied with p 0.5."""
    for _ in range(2):
        name = OPERATIONS[int(rng.integers(len(OPERATIONS)))]
        magnitude = int(rng.integers(1, 10))
        if rng.random() < 0.5:
            img = rand_operation(img, name, magnitude, rng)
    return img


def _flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return TF.hflip(img) if rng.random() < 0.5 else img


def crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, as torchvision's RandomResizedCrop draws it."""
    for _ in range(10):
        target = width * height * rng.uniform(*CROP_SCALE)
        ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])))
        w = round(np.sqrt(target * ratio))
        h = round(np.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    side = min(width, height)  # fallback: the central square
    return (height - side) // 2, (width - side) // 2, side, side


def augmented_view(
    img: Image.Image,
    rng: np.random.Generator,
    augment: str,
    size: tuple[int, int],
    interpolation: str,
) -> Image.Image:
    """One view of `img` at `size` (h, w), drawn from `augment`."""
    mode = TF.InterpolationMode(interpolation)
    if augment == "crop_flip":
        top, left, h, w = crop_box(img.width, img.height, rng)
        view = TF.resized_crop(img, top, left, h, w, list(size), interpolation=mode, antialias=True)
        return _flip(view, rng)
    assert augment == "reference", augment
    # CLIP's resize and centre crop, then cutout, flip and RandAugment
    view = TF.resize(img, min(size), interpolation=mode, antialias=True)
    view = TF.center_crop(view, list(size))
    return rand_augment(_flip(cutout(view, rng), rng), rng)
