"""The bad-input corpus: malformed manifests (an independent oracle of the manifest format, and
hypothesis strategies), corrupt and odd images, odd label files. Every case must give a correct
result or one clear error line.

The manifest oracle follows data_manifests/README.md, not the implementation: UTF-8 (a leading BOM
tolerated, as the label files tolerate it), one JSON object a line (universal newlines; blank lines
skipped), keys image, positive and negative; `image` a relative '/'-separated path without '..' or
surrounding spaces, encodable, without control characters; `positive`/`negative` lists of distinct
non-empty strings that never share a label, or `"negative": "*"`; each image once.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from hypothesis import strategies as st

from tests.reliability.faults.outcome import Outcome
from tests.reliability.harness import ImageData, cli, error_problems, extract_argv
from tests.tiny import SEEN, UNSEEN, TinyClip, embed_args

KEYS = {"image", "positive", "negative"}
VOCAB = SEEN + UNSEEN


# ---------------------------------------------------------------------------------- manifest oracle
class Reject(Exception):
    """The oracle's verdict: this manifest must be refused."""


def _image_ok(image: object) -> bool:
    if not isinstance(image, str) or not image.strip() or image != image.strip():
        return False
    try:
        image.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no file system can name it
        return False
    if any(ord(c) < 32 or ord(c) == 127 for c in image):
        return False
    parts = image.split("/")
    return not (image.startswith("/") or "\\" in image or ":" in parts[0] or ".." in parts)


def _labels(value: object) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not all(isinstance(v, str) and v for v in value)
        or len(set(value)) != len(value)
    ):
        raise Reject("labels")
    return tuple(value)


def _oracle_record(line: str) -> tuple[str, tuple[str, ...], tuple[str, ...] | str]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise Reject("json") from e
    if not isinstance(obj, dict) or not set(obj) <= KEYS or not _image_ok(obj.get("image")):
        raise Reject("record")
    positive = _labels(obj.get("positive", []))
    negative = "*" if obj.get("negative") == "*" else _labels(obj.get("negative", []))
    if negative != "*" and set(positive) & set(negative):
        raise Reject("both")
    return obj["image"], positive, negative


def manifest_oracle(data: bytes) -> list[tuple[str, tuple[str, ...], tuple[str, ...] | str]]:
    """A manifest file's records as (image, positive, negative or "*"); raises `Reject`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Reject("utf-8") from e
    text = text.removeprefix("\ufeff")
    records = []
    images = set()
    for line in re.split(r"\r\n|\r|\n", text):
        if not line.strip():
            continue
        record = _oracle_record(line)
        if record[0] in images:
            raise Reject("duplicate image")
        images.add(record[0])
        records.append(record)
    return records


def _as_tuple(rec) -> tuple[str, tuple[str, ...], tuple[str, ...] | str]:
    return rec.image, rec.positive, "*" if rec.negative_rest else rec.negative


def check_read_manifest(path: Path, data: bytes) -> list[str]:
    """`read_manifest` on `data` agrees with the oracle, or refuses naming the file (QKSError)."""
    from qks_pipeline.data.manifest import read_manifest
    from qks_pipeline.errors import QKSError

    path.write_bytes(data)
    try:
        expected = manifest_oracle(data)
    except Reject as e:
        expected = e
    try:
        got = [_as_tuple(r) for r in read_manifest(path)]
    except QKSError as e:
        if not isinstance(expected, Reject):
            return [f"refused a valid manifest: {e.message}"]
        return (
            []
            if e.message.startswith(str(path)) and "\n" not in e.message
            else [f"unclear: {e.message!r}"]
        )
    except Exception as e:  # anything else reaches the user as a traceback
        return [f"{type(e).__name__} escaped: {str(e)[:100]}"]
    if isinstance(expected, Reject):
        return [f"accepted a manifest the format forbids ({expected})"]
    return [] if got == expected else [f"records differ: {got[:2]} vs {expected[:2]}"]


def _check_verdict(records: list, test_images: set[str]) -> tuple[int | None, str]:
    """(images `qks manifest check` must count in train.jsonl or None when it must refuse, the file
    a refusal names). The check reads train.jsonl first: an image also in the test split is reported
    on test.jsonl's line."""
    labels = {label for _, pos, neg in records for label in pos + (() if neg == "*" else neg)}
    if not records or not labels <= set(VOCAB):
        return None, "train.jsonl"
    return (
        (None, "test.jsonl")
        if {r[0] for r in records} & test_images
        else (len(records), "train.jsonl")
    )


def check_manifest_cli(dataset: Path, data: bytes) -> list[str]:
    """`qks manifest check` on a dataset whose train.jsonl is `data`: exit 0 with the right image
    count, or exit 1 with one error line naming the right file; never an escaped exception."""
    (dataset / "train.jsonl").write_bytes(data)
    test_images = {
        json.loads(line)["image"] for line in (dataset / "test.jsonl").read_text().splitlines()
    }
    try:
        expected, named = _check_verdict(manifest_oracle(data), test_images)
    except Reject:
        expected = None
        named = "train.jsonl"
    code, output, escaped = cli("manifest", "check", dataset)
    if escaped is not None or code not in (0, 1) or "Traceback" in output:
        return [f"exit {code}, escaped {type(escaped).__name__}: {output[-200:]!r}"]
    if expected is None:
        problems = (
            error_problems(output, str(dataset / named))
            if code == 1
            else ["accepted a manifest it must refuse"]
        )
        return problems + ([] if len(output.strip().splitlines()) == 1 else ["more than one line"])
    if code != 0:
        return [f"refused a valid manifest: {output.strip()[:200]}"]
    return (
        []
        if f"train: {expected} images," in output
        else [f"wrong count, {expected} expected: {output[:200]}"]
    )


# ------------------------------------------------------------------------------ manifest strategies
# valid, plain ASCII
IMAGE_PATHS = st.from_regex(r"[a-z]{1,4}(/[a-z0-9]{1,4}){0,2}\.(jpg|png)", fullmatch=True)


def _record_dicts() -> st.SearchStrategy:
    label = st.sampled_from(VOCAB + ["", " red", "purple", "*", "red\n"])
    forbidden = [
        "../x.jpg",
        "/abs.jpg",
        "a\\b.jpg",
        "C:/x.jpg",
        " a.jpg",
        "",
        "a\x00.jpg",
        "a\ud800.jpg",
        "a\nb.jpg",
    ]
    image = st.one_of(IMAGE_PATHS, st.sampled_from([*forbidden, "é/ü.jpg"]), st.integers())
    labels = st.one_of(
        st.lists(label, max_size=4), st.just("*"), st.none(), st.text(max_size=3), st.integers()
    )
    optional = {"positive": labels, "negative": labels, "extra": st.integers()}
    return st.fixed_dictionaries({"image": image}, optional=optional)


@st.composite
def _valid_record(draw) -> dict:
    """A record the format allows, labels from the vocabulary (`manifest check` must accept it)."""
    image = draw(IMAGE_PATHS)
    labels = draw(st.permutations(VOCAB))
    k = draw(st.integers(0, 3))
    record = {"image": image, "positive": labels[:k]}
    negative = draw(st.one_of(st.just("*"), st.integers(0, 3).map(lambda n: labels[k : k + n])))
    return record | ({"negative": negative} if draw(st.booleans()) else {})


def _line() -> st.SearchStrategy:
    valid = _valid_record().map(lambda d: json.dumps(d, ensure_ascii=draw_ascii(d)))
    json_line = _record_dicts().map(lambda d: json.dumps(d, ensure_ascii=False))
    mangled = st.tuples(json_line, st.integers(0, 60), st.text(max_size=3)).map(
        lambda t: t[0][: t[1]] + t[2]
    )
    blank = ["", "   ", "\x0c", "\u2028"]  # blank, or a line break to str.splitlines
    not_records = [
        "[]",
        "null",
        "{}",
        "1" * 5000,
        "[" * 3000,
        '{"image": "a.jpg",}',
        '{"image": "a.jpg"} trailing',
    ]
    junk = st.one_of(json_line, mangled, st.sampled_from(blank + not_records), st.text(max_size=20))
    return st.one_of(valid, valid, valid, valid, valid, valid, junk)


def draw_ascii(record: dict) -> bool:
    """Non-ASCII text as real manifests write it: escaped (json.dumps' default) or raw UTF-8."""
    return len(record["image"]) % 2 == 0


@st.composite
def manifest_bytes(draw) -> bytes:
    """A train.jsonl: JSON-ish lines, assorted newlines, sometimes a BOM or a stray invalid byte."""
    lines = draw(st.lists(_line(), max_size=6))
    text = "".join(line + draw(st.sampled_from(["\n", "\r\n", "\r", "\n\n"])) for line in lines)
    data = text.encode("utf-8", errors="surrogatepass")
    if draw(st.booleans()) and draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.sampled_from([False] * 15 + [True])):  # about one manifest in 16
        cut = draw(st.integers(0, len(data)))
        data = (
            data[:cut]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80"]))
            + data[cut:]
        )
    return data


# Hand-picked manifests, each a known way to break a parser, with a valid line around it.
GOOD = b'{"image": "x/good.jpg", "positive": ["red"], "negative": "*"}\n'
NASTY_MANIFESTS: dict[str, bytes] = {
    "empty file": b"",
    "blank lines only": b"\n  \n\r\n",
    "BOM": b"\xef\xbb\xbf" + GOOD,
    "CRLF": GOOD.replace(b"\n", b"\r\n") * 1 + b'{"image": "x/2.jpg"}\r\n',
    "lone CR between records": GOOD.rstrip(b"\n") + b'\r{"image": "x/2.jpg"}\n',
    "Latin-1 bytes": GOOD + '{"image": "x/caf\xe9.jpg"}\n'.encode("latin-1"),
    "invalid UTF-8 in the middle": GOOD + b'{"image": "x/\xff.jpg"}\n',
    "deep nesting": GOOD + b"[" * 100_000 + b"\n",
    "a 5000-digit number": GOOD + b'{"image": "x/2.jpg", "positive": [' + b"1" * 5000 + b"]}\n",
    "NUL in the image path": GOOD + b'{"image": "x/a\\u0000.jpg"}\n',
    "lone surrogate in the image path": GOOD + b'{"image": "x/\\ud800.jpg"}\n',
    "newline in the image path": GOOD + b'{"image": "x/a\\nb.jpg"}\n',
    "top-level array": b'[{"image": "x/good.jpg"}]\n',
    "trailing comma": b'{"image": "x/good.jpg",}\n',
    "negative '*' inside a list": b'{"image": "x/good.jpg", "negative": ["*"]}\n',
    "positive '*'": b'{"image": "x/good.jpg", "positive": "*"}\n',
    "label null": b'{"image": "x/good.jpg", "positive": [null]}\n',
    "image listed twice": GOOD + GOOD,
    "image also in the test split": GOOD + b'{"image": "t/1.jpg", "positive": ["red"]}\n',
    "label both positive and negative": (
        b'{"image": "x/1.jpg", "positive": ["red"], "negative": ["red"]}\n'
    ),
    "unicode image path": '{"image": "dossier/été/日本.jpg", "positive": ["red"]}\n'.encode(),
    "decomposed label not in the vocabulary": (
        '{"image": "x/1.jpg", "positive": ["re\u0301d"]}\n'.encode()
    ),
    "a 1 MB line": b'{"image": "x/1.jpg", "positive": ["red"], "negative": ["'
    + b"g" * 1_000_000
    + b'"]}\n',
}


# ------------------------------------------------------------------------------------------- images
def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` and holds no pixels: a decompression bomb to refuse."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@dataclass(frozen=True)
class ImageCase:
    path: str  # relative to the image root
    bad: str | None = None  # the word the recorded reason must contain; None: the image must load
    same_as: str | None = None  # a plain RGB PNG whose tokens this image's must equal


def _rgb(seed: int, size: tuple[int, int] = (72, 56)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _save(root: Path, rel: str, write) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    write(root / rel)


def _odd_modes(root: Path) -> list[ImageCase]:
    """Images in unusual modes, each with a plain RGB PNG of the pixels it must be read as (computed
    here, with numpy, not with the library's conversion)."""
    from PIL import Image

    cases = []
    pixels = _rgb(1)
    _save(root, "odd/plain.png", lambda p: Image.fromarray(pixels).save(p))
    _save(root, "odd/png_named.jpg", lambda p: Image.fromarray(pixels).save(p, format="PNG"))
    cases.append(ImageCase("odd/png_named.jpg", same_as="odd/plain.png"))
    deep = (np.random.default_rng(2).integers(0, 65536, (50, 70))).astype(np.uint16)
    _save(root, "odd/deep16.png", lambda p: Image.fromarray(deep).save(p))
    grey = np.repeat(np.round(deep / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    _save(root, "odd/deep16_ref.png", lambda p: Image.fromarray(grey).save(p))
    cases.append(ImageCase("odd/deep16.png", same_as="odd/deep16_ref.png"))
    palette = np.random.default_rng(3).integers(0, 256, (16, 3), dtype=np.uint8)
    index = np.random.default_rng(4).integers(0, 16, (60, 60), dtype=np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette(palette.flatten().tolist())
    _save(root, "odd/palette.png", lambda p: pal.save(p))
    _save(root, "odd/palette_ref.png", lambda p: Image.fromarray(palette[index]).save(p))
    cases.append(ImageCase("odd/palette.png", same_as="odd/palette_ref.png"))
    alpha = np.random.default_rng(5).integers(0, 256, (60, 60), dtype=np.uint16)
    rgba = np.concatenate([_rgb(6, (60, 60)), alpha[..., None].astype(np.uint8)], axis=2)
    on_white = np.round(
        (rgba[..., :3] * alpha[..., None] + 255 * (255 - alpha[..., None])) / 255
    ).astype(np.uint8)
    _save(root, "odd/rgba.png", lambda p: Image.fromarray(rgba, "RGBA").save(p))
    _save(root, "odd/rgba_ref.png", lambda p: Image.fromarray(on_white).save(p))
    cases.append(ImageCase("odd/rgba.png", same_as="odd/rgba_ref.png"))
    return cases + _cmyk_and_gif(root)


def _cmyk_and_gif(root: Path) -> list[ImageCase]:
    from PIL import Image

    cmyk = np.random.default_rng(7).integers(0, 256, (48, 64, 4), dtype=np.uint8)
    # lossless, so pixels are exact
    _save(root, "odd/cmyk.tif", lambda p: Image.fromarray(cmyk, "CMYK").save(p))
    k = 255 - cmyk[..., 3:].astype(np.float64)
    # PIL's CMYK -> RGB formula
    rgb = np.round((255 - cmyk[..., :3].astype(np.float64)) * k / 255).astype(np.uint8)
    _save(root, "odd/cmyk_ref.png", lambda p: Image.fromarray(rgb).save(p))
    frames = [Image.fromarray(_rgb(8 + i, (40, 40))).quantize(64) for i in range(3)]
    _save(
        root,
        "odd/animated.gif",
        lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]),
    )
    _save(root, "odd/animated_ref.png", lambda p: frames[0].convert("RGB").save(p))
    tall = _rgb(11, (1, 3000))  # an extreme aspect ratio: 64 x 192,000 after the short-side resize
    _save(root, "odd/tall.png", lambda p: Image.fromarray(tall).save(p))
    return [
        ImageCase("odd/cmyk.tif", same_as="odd/cmyk_ref.png"),
        ImageCase("odd/animated.gif", same_as="odd/animated_ref.png"),
        ImageCase("odd/tall.png"),
    ]


def _broken(root: Path) -> list[ImageCase]:
    from PIL import Image

    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(_rgb(12)).save(jpeg, "JPEG")
    Image.fromarray(_rgb(13)).save(png, "PNG")
    files = {
        "bad/truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "bad/truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "bad/empty.jpg": b"",
        "bad/html.jpg": b"<html><body>404 Not Found</body></html>",
        "bad/bomb.png": png_header_only(30000, 30000),
        "bad/bomb_warning.png": png_header_only(10000, 10000),
    }
    for rel, data in files.items():
        _save(root, rel, lambda p, data=data: p.write_bytes(data))
    (root / "bad/folder.jpg").mkdir()
    reasons = {
        "bad/truncated.jpg": "truncated",
        "bad/truncated.png": "truncated",
        "bad/empty.jpg": "empty",
        "bad/html.jpg": "not a readable image",
        "bad/bomb.png": "decompression bomb",
        "bad/bomb_warning.png": "decompression bomb",
        "bad/folder.jpg": "not a file",
        "bad/missing.jpg": "missing",
    }
    return [ImageCase(rel, bad=word) for rel, word in reasons.items()]


def make_image_corpus(root: Path) -> list[ImageCase]:
    """Write the odd and broken images under `root`; returns the cases (reference PNGs included)."""
    cases = _odd_modes(root) + _broken(root)
    refs = {c.same_as for c in cases if c.same_as}
    return cases + [ImageCase(ref) for ref in sorted(refs)]


def write_corpus_dataset(dataset: Path, cases: list[ImageCase]) -> None:
    """A dataset directory whose train split lists every corpus image once."""
    dataset.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"image": c.path, "positive": ["red"], "negative": "*"}) for c in cases]
    (dataset / "train.jsonl").write_text("\n".join(lines) + "\n")
    (dataset / "test.jsonl").write_text(
        json.dumps({"image": "test/none.jpg", "positive": ["yellow"]}) + "\n"
    )
    (dataset / "seen.txt").write_text("\n".join(SEEN) + "\n")
    (dataset / "unseen.txt").write_text("\n".join(UNSEEN) + "\n")


def check_extracted_corpus(store: Path, cases: list[ImageCase]) -> dict[str, str]:
    """Per case, what is wrong in the store `qks extract` wrote (empty dict: all correct)."""
    from qks_pipeline.store.features import open_cache

    cache = open_cache(store)
    paths, valid = list(cache.paths[:]), cache.valid[:]
    row = {p: i for i, p in enumerate(paths)}
    reasons = {s["path"]: s["reason"] for s in cache.skipped()}
    tokens = cache.tokens[:, 0].astype(np.float32)  # (N, T, D)
    wrong = {}
    for c in cases:
        i = row[c.path]
        if c.bad is not None:
            if valid[i] or c.bad not in reasons.get(c.path, ""):
                wrong[c.path] = (
                    f"expected masked ({c.bad}), "
                    f"got valid={valid[i]} reason={reasons.get(c.path)!r}"
                )
        elif not valid[i]:
            wrong[c.path] = f"must load, masked: {reasons.get(c.path)!r}"
        elif c.same_as is not None and not np.allclose(
            tokens[i], tokens[row[c.same_as]], rtol=2e-3, atol=2e-3
        ):
            gap = np.abs(tokens[i] - tokens[row[c.same_as]]).max()
            wrong[c.path] = f"tokens differ from {c.same_as}: max {gap}"
    return wrong


def check_listed_problems(output: str, cases: list[ImageCase], images: Path) -> dict[str, str]:
    """`qks manifest check --images` must list exactly the images extraction masks out."""
    wrong = {}
    for c in cases:
        listed = f"{images / c.path}: " in output
        if listed != (c.bad is not None):
            wrong[c.path] = (
                "listed as a problem but loads"
                if listed
                else f"not listed, extraction masks it ({c.bad})"
            )
    return wrong


# -------------------------------------------------------------------------------------- label files
@dataclass(frozen=True)
class LabelCase:
    name: str
    seen: bytes  # seen.txt
    unseen: bytes  # unseen.txt
    # the labels read, or what the one error line must contain
    expect: tuple[list[str], list[str]] | str


def _lines(*labels: str, sep: str = "\n") -> bytes:
    return (sep.join(labels) + sep).encode()


UNI = ["café", "日本語", "🐕 dog", "naïve art", "old town"]
LABEL_CASES = [
    LabelCase(
        "empty and blank lines",
        b"\nred\n\n  \ngreen\nblue\n\n",
        b"\n\nyellow\n",
        (["red", "green", "blue"], ["yellow"]),
    ),
    LabelCase(
        "surrounding spaces and tabs",
        b"  red \n\tgreen\t\n blue\n",
        b" yellow \n",
        (["red", "green", "blue"], ["yellow"]),
    ),
    LabelCase(
        "CRLF and a BOM",
        b"\xef\xbb\xbfred\r\ngreen\r\nblue\r\n",
        b"yellow\r\n",
        (["red", "green", "blue"], ["yellow"]),
    ),
    LabelCase(
        "unicode, emoji and inner spaces", _lines(*UNI[:3]), _lines(*UNI[3:]), (UNI[:3], UNI[3:])
    ),
    LabelCase(
        "NFC and NFD spellings are two labels",
        _lines("café", "cafe\u0301"),
        _lines("tea"),
        (["café", "cafe\u0301"], ["tea"]),
    ),
    LabelCase("no final newline", b"red\ngreen", b"yellow", (["red", "green"], ["yellow"])),
    LabelCase("a label twice", b"red\ngreen\nred\n", b"yellow\n", "listed twice (first on line 1)"),
    LabelCase("a label twice after stripping", b"red\n red\n", b"yellow\n", "listed twice"),
    LabelCase("a label both seen and unseen", b"red\ngreen\n", b"green\n", "both seen and unseen"),
    LabelCase("empty file", b"\n \n", b"yellow\n", "empty"),
    LabelCase("Latin-1 bytes", "red\ncafé\n".encode("latin-1"), b"yellow\n", "UTF-8"),
    LabelCase(
        "a form feed inside a label", b"red\nx\x0cy\n", b"yellow\n", (["red", "x\x0cy"], ["yellow"])
    ),
    LabelCase(
        "a line separator inside a label",
        _lines("red", "a\u2028b"),
        b"yellow\n",
        (["red", "a\u2028b"], ["yellow"]),
    ),
]


def write_label_dataset(dataset: Path, case: LabelCase) -> None:
    """seen.txt/unseen.txt of the case, and manifests using every label it expects (or 'red')."""
    dataset.mkdir(parents=True, exist_ok=True)
    (dataset / "seen.txt").write_bytes(case.seen)
    (dataset / "unseen.txt").write_bytes(case.unseen)
    seen, unseen = case.expect if isinstance(case.expect, tuple) else (["red"], [])
    train = [{"image": f"train/{i}.jpg", "positive": [label]} for i, label in enumerate(seen)]
    test = [
        {"image": f"test/{i}.jpg", "positive": [label]} for i, label in enumerate(seen + unseen)
    ]
    for name, records in (("train.jsonl", train), ("test.jsonl", test)):
        (dataset / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def check_label_case(work: Path, case: LabelCase, clip: TinyClip | None = None) -> list[str]:
    """`qks manifest check` and `qks import manifest` (and `embed-labels` with the tiny model
    `clip`, when given) on the case: the labels read back exactly, or one error line naming the
    label file."""
    from qks_pipeline.data.manifest import read_vocabulary
    from qks_pipeline.store.label_store import read_label_embeddings

    dataset = work / "dataset"
    write_label_dataset(dataset, case)
    runs = [
        ("check", ["manifest", "check", dataset]),
        ("import", ["import", "manifest", "--root", dataset, "--out", work / "imported"]),
    ]
    if clip is not None:
        prompts = SimpleNamespace(dataset=dataset, templates=work / "templates.txt")
        prompts.templates.write_text("a photo of a {}.\n")
        runs.append(("embed-labels", embed_args(prompts, clip, work / "labels.zarr")))
    problems = []
    for what, argv in runs:
        code, output, escaped = cli(*argv)
        if escaped is not None or "Traceback" in output:
            problems.append(f"{what}: {type(escaped).__name__} escaped")
        elif isinstance(case.expect, str):
            names_file = "seen.txt" in output or "unseen.txt" in output
            if (
                code != 1
                or case.expect not in output
                or not names_file
                or len(output.strip().splitlines()) != 1
            ):
                problems.append(
                    f"{what}: exit {code}, {case.expect!r} and the file expected: "
                    f"{output.strip()[:150]!r}"
                )
        elif code != 0:
            problems.append(f"{what}: refused: {output.strip()[:150]!r}")
        elif (
            what == "check"
            and f"{len(case.expect[0])} seen + {len(case.expect[1])} unseen labels" not in output
        ):
            problems.append(f"check: wrong counts: {output.splitlines()[0]!r}")
        elif what == "import" and read_vocabulary(work / "imported") != case.expect:
            problems.append(f"import: wrote {read_vocabulary(work / 'imported')}")
        elif what == "embed-labels":
            names, emb, _ = read_label_embeddings(work / "labels.zarr")
            if names != case.expect[0] + case.expect[1] or emb.shape[0] != len(names):
                problems.append(f"embed-labels: stored {names} ({emb.shape[0]} rows)")
    return problems


def label_outcome(work: Path, clip: TinyClip | None) -> Outcome:
    """Every label-file case through check, import and (optionally) embed-labels."""
    outcome = Outcome("odd label files (check, import, embed-labels)")
    for i, case in enumerate(LABEL_CASES):
        problems = check_label_case(work / f"case{i}", case, clip)
        for p in problems:
            outcome.note(f"{case.name}: {p}")
        wrong = any(
            "wrong" in p or "wrote" in p or "stored" in p or "refused" in p for p in problems
        )
        outcome.add(wrong=wrong, unclear=any("escaped" in p or "expected" in p for p in problems))
    return outcome


# -------------------------------------------------------------------------------- the report's rows
WRONG_WORDS = ("accepted", "refused a valid", "records differ", "wrong count")


def _tally(outcome: Outcome, name: str, problems: list[str]) -> None:
    for p in problems:
        outcome.note(f"{name}: {p[:160]}")
    wrong = any(w in p for p in problems for w in WRONG_WORDS)
    outcome.add(wrong=wrong, unclear=bool(problems) and not wrong, ok=not problems)


def manifest_outcome(work: Path, examples: int, seed: int = 0) -> Outcome:
    """`read_manifest` and `manifest check` on the hand-picked and `examples` fuzzed manifests."""
    from hypothesis import Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    outcome = Outcome("malformed manifests (read_manifest, manifest check)")
    dataset = work / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    (dataset / "seen.txt").write_text("\n".join(SEEN) + "\n")
    (dataset / "unseen.txt").write_text("\n".join(UNSEEN) + "\n")
    (dataset / "test.jsonl").write_text(
        json.dumps({"image": "t/1.jpg", "positive": ["red"]}) + "\n"
    )

    def one(name: str, data: bytes) -> None:
        _tally(
            outcome,
            name,
            check_read_manifest(work / "m.jsonl", data) + check_manifest_cli(dataset, data),
        )

    for name, data in NASTY_MANIFESTS.items():
        one(name, data)

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate])
    @given(manifest_bytes())
    def fuzz(data: bytes) -> None:
        one(f"fuzzed {data[:40]!r}", data)

    fuzz()
    return outcome


def image_outcome(work: Path, clip: TinyClip) -> Outcome:
    """Every corpus image through `qks extract` (masked with its reason, or read as its plain-RGB
    twin) and through `qks manifest check --images` (listed exactly when extraction masks it)."""
    outcome = Outcome("corrupt and odd images (extract, manifest check)")
    cases = make_image_corpus(work / "images")
    write_corpus_dataset(work / "dataset", cases)
    code, output, escaped = cli(
        *extract_argv(ImageData(work / "dataset", work / "images"), clip, work / "s.zarr", 8)
    )
    if code != 0 or escaped is not None:
        outcome.note(f"extract failed: {output[-200:]!r}")
        outcome.add(unclear=True, ok=False)
        return outcome
    wrong = check_extracted_corpus(work / "s.zarr", cases)
    code, output, escaped = cli("manifest", "check", work / "dataset", "--images", work / "images")
    listed = check_listed_problems(output, cases, work / "images") if escaped is None else {}
    for c in cases:  # a mismatch is a wrong result: a wrong mask, wrong tokens, or a wrong listing
        problems = [f"extract: {wrong[c.path]}" for _ in range(c.path in wrong)]
        problems += [f"check: {listed[c.path]}" for _ in range(c.path in listed)]
        for p in problems:
            outcome.note(f"{c.path}: {p[:160]}")
        outcome.add(wrong=bool(problems))
    if escaped is not None:
        outcome.note(f"manifest check: {type(escaped).__name__} escaped")
        outcome.unclear += 1
    return outcome
