"""Rebuild the bundled sample dataset from the Debian packages openclipart-svg and openclipart-png.

Labels are the authors' own tags: the keywords in each SVG's RDF metadata (`<dc:subject>`) plus the
words of its title (`<dc:title>` of the `cc:Work`). Tags are lower-cased, split into words,
singularised, mapped through a small explicit synonym/translation table, kept only if they are in an
allow-list of concrete nouns, and closed under a small "is-a" table (a dog is a mammal is an
animal). Pictures with a deny-listed word (icon, flag, sign, symbol, map, ...) in their tags, title
or file name, and pictures whose SVG metadata does not declare public domain, are left out. Every
vocabulary label an image does not carry is written as a verified negative (see README.md).

Run from the repository root: `.venv/bin/python data_manifests/sample/build_sample.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import os
import random
import re
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from qks_pipeline.data.manifest import (
    Record,
    read_manifest,
    read_vocabulary,
    write_labels,
    write_manifest,
)

SVG_ROOT = Path("/usr/share/openclipart/svg")
PNG_ROOT = Path("/usr/share/openclipart/png")
OUT_DIR = Path(__file__).resolve().parent
# a few openclipart PNGs are 10k x 16k renders of small drawings
Image.MAX_IMAGE_PIXELS = 300_000_000

# --------------------------------------------------------------------------------------------------
# Vocabulary tables
# --------------------------------------------------------------------------------------------------

# Multi-word names joined into one token before splitting ("teddy bear" is a toy, not a bear).
PHRASES = {
    "ice cream": "icecream",
    "teddy bear": "teddybear",
    "hot dog": "hotdog",
    "light bulb": "lightbulb",
    "fire engine": "firetruck",
    "fire truck": "firetruck",
    "rubber duck": "rubberduck",
    "paper plane": "paperplane",
    "sun flower": "sunflower",
    "palm tree": "palmtree",
    "baby bottle": "babybottle",
    "pan cake": "pancake",
    "table tennis": "tabletennis",
    "magnifying glass": "magnifier",
    "magnifing glass": "magnifier",
}

# Plurals that the suffix rules get wrong.
IRREGULAR = {
    "leaves": "leaf",
    "knives": "knife",
    "wolves": "wolf",
    "children": "child",
    "men": "man",
    "women": "woman",
    "feet": "foot",
    "teeth": "tooth",
    "geese": "goose",
    "mice": "mouse",
    "tomatoes": "tomato",
    "potatoes": "potato",
    "scissors": "scissors",
    "glasses": "glasses",  # spectacles, not the "glass" label
    "sunglasses": "sunglasses",
    "clothes": "clothing",
    "stickmen": "stickman",
}


def _table(text: str) -> dict[str, str]:
    """Parse lines `key: word word ...` into {word: key}."""
    out = {}
    for line in text.strip().splitlines():
        key, words = line.split(":")
        out.update(dict.fromkeys(words.split(), key.strip()))
    return out


# Word -> label: obvious synonyms, hyponyms folded into a label, and the Italian/French words common
# in the titles.
SYNONYMS = _table(
    """
    animal: animale animali
    bird: uccello uccelli
    insect: bug insetto
    fish: pesce pescetto
    dog: puppy beagle bulldog labrador cane
    cat: kitten gatto gattina
    horse: cavallo pony
    bear: orso ours grizzly
    pig: piglet cochon maiale
    cow: mucca vacca cattle
    sheep: pecora lamb
    monkey: chimp chimpanzee scimmia
    elephant: elefante elefant olifant
    tiger: tigre
    lion: leone
    dolphin: delfino
    penguin: tux pinguino
    duck: papera anatra
    chicken: hen rooster gallo gallina pollo
    eagle: aquila acquila
    owl: gufo
    swan: cigno cigni
    butterfly: farfalla papillon
    bee: abeille
    ant: formica formichina formicona
    spider: ragno ragnetto
    ladybug: ladybird coccinella coccinelle coccinellona
    dragonfly: libellula libellule damselfly
    frog: rana froggy toad
    lizard: lucertola lucertolona lucertolone
    turtle: tortoise
    dinosaur: dino dinosauro dinosauri
    rabbit: bunny coniglio
    deer: fawn
    whale: orca
    drink: beverage
    apple: mela
    lemon: limone
    grape: uva
    strawberry: fragola
    pumpkin: zucca
    tomato: pomodoro pomodori
    potato: patata
    carrot: carota
    pepper: peperoncino chili paprika cayenne habanero
    onion: cipolla
    mushroom: champignon toadstool fungo
    icecream: gelato
    cake: torta cupcake
    candy: lollipop
    bread: pane loaf
    cheese: formaggio
    egg: uovo
    meat: steak salami bacon
    hamburger: burger
    sandwich: tramezzino
    coffee: caffe coffe
    wine: vino
    beer: birra
    cup: mug teacup tazza cuppa
    bottle: bottiglia
    flower: fiore fiori tulip daisy sunflower magnolia geranium
    rose: rosa
    tree: albero arbre evergreen palmtree sapin
    leaf: foglia foglie
    cactus: cacut
    car: automobile auto voiture sedan jeep hummer
    truck: lorry firetruck
    boat: ship sailboat trawler yacht canoe barca
    airplane: plane aircraft aeroplane airliner aereo
    bicycle: bike bicicletta vtt
    train: treno locomotive
    motorcycle: motorbike
    tractor: trattore
    house: home casa maison cottage chalet villa
    church: chiesa cathedral
    tower: torre
    castle: castello chateau
    person: people human persona
    man: uomo signore male
    woman: donna lady signorina female
    child: boy kid youngster bambina bambino
    hat: cap fedora sombrero tophat cappello
    shoe: sneaker boot sandal footwear
    shirt: camicia
    glove: mitten
    tool: utensile
    hammer: martello
    saw: bowsaw chainsaw sega
    scissors: scissor forbici
    knife: coltello
    axe: ascia
    wrench: spanner
    brush: paintbrush pennello
    pen: penna
    pencil: matita
    gun: pistol rifle revolver pistola
    sword: spada katana
    guitar: chitarra
    piano: pianoforte
    drum: tamburo
    trumpet: tromba
    violin: violino fiddle
    saxophone: sax
    chair: sedia armchair poltrona
    table: tavolo
    sofa: couch divano
    bed: letto
    lamp: lampada
    candle: candela
    umbrella: ombrello ombrellone
    computer: pc workstation
    telephone: phone telefono cellphone
    television: tv televisore
    camera: webcam camcorder telecamera
    printer: stampante
    clock: orologio
    lightbulb: bulb lampadina
    book: libro bible
    ball: palla
    balloon: palloncino palloncini
    toy: giocattolo
    teddy bear: teddybear teddy
    box: scatola scatolone
    bag: borsa paperbag
    """
)

# Concrete nouns that may become labels (before the minimum-count cut).
ALLOWED = frozenset(
    """
    animal mammal bird insect fish reptile
    dog cat horse bear pig cow sheep monkey elephant tiger lion dolphin whale rabbit deer wolf
    penguin duck chicken eagle owl swan butterfly bee ant spider ladybug dragonfly
    frog lizard turtle snake dinosaur
    food fruit vegetable dessert drink
    apple lemon banana grape strawberry cherry pear pumpkin tomato potato carrot pepper corn onion
    mushroom bread cake candy icecream pizza muffin pancake cheese egg meat hamburger sandwich
    coffee tea milk wine beer juice cup glass bottle
    plant flower tree leaf cactus rose
    vehicle car truck boat airplane bicycle train bus motorcycle rocket tractor
    building house church tower castle lighthouse
    person man woman child
    clothing hat shoe shirt glove
    tool hammer saw scissors knife axe wrench brush pen pencil weapon gun sword
    instrument guitar piano drum trumpet violin saxophone
    furniture chair table sofa bed lamp candle umbrella
    computer laptop telephone television camera printer clock lightbulb battery robot
    book ball balloon toy box bag
    """.split()
) | {"teddy bear"}

# Display names for labels whose token differs from the natural English name.
DISPLAY = {"icecream": "ice cream", "instrument": "musical instrument", "lightbulb": "light bulb"}

# is-a: every label implies its parent (and so on up).
PARENTS = _table(
    """
    animal: mammal bird insect fish reptile spider frog
    mammal: dog cat horse bear pig cow sheep monkey elephant tiger lion dolphin whale
    mammal: rabbit deer wolf
    bird: penguin duck chicken eagle owl swan
    insect: butterfly bee ant ladybug dragonfly
    reptile: lizard turtle snake dinosaur
    fruit: apple lemon banana grape strawberry cherry pear
    vegetable: tomato potato carrot pepper corn onion pumpkin
    dessert: cake candy icecream muffin
    food: fruit vegetable dessert bread pizza pancake cheese egg meat hamburger sandwich
    drink: coffee tea milk wine beer juice
    plant: flower tree cactus
    flower: rose
    vehicle: car truck boat airplane bicycle train bus motorcycle tractor
    building: house church tower castle lighthouse
    person: man woman child
    clothing: hat shoe shirt glove
    tool: hammer saw scissors knife axe wrench
    weapon: gun sword
    instrument: guitar piano drum trumpet violin saxophone
    furniture: chair table sofa bed
    computer: laptop
    """
)
PARENTS["teddy bear"] = "toy"

# A label named by an image's tags is dropped when the tags also carry one of these words (before
# the is-a closure): a hot dog is no dog, a teddy bear no bear, a dolphin no fish, a hat in the
# "people" category no person, a lifebelt in the "boating" category no boat, the "Little Boy" bomb
# no child.
_PEOPLE_VETO = {"bomb", "alien", "babybottle", "pin"}
VETO = {
    "dog": {"hotdog"},
    "bear": {"teddybear"},
    "duck": {"rubberduck"},
    "airplane": {"paperplane"},
    "glass": {"magnifier"},
    "fish": {"dolphin", "whale", "crawfish", "mammal"},
    "boat": {"knot", "lifebelt", "anchor", "scuba", "lighthouse"},
    "house": {"lighthouse"},
    "computer": {"tux", "linux"},
    "person": _PEOPLE_VETO | {"clothing", "brain", "fingerprint", "eye", "skull"},
    "man": _PEOPLE_VETO,
    "woman": _PEOPLE_VETO,
    "child": _PEOPLE_VETO,
}

# An image carrying any of these words is not a picture of a real-world thing (or is a UI element)
# and is left out.
DENY = frozenset(
    """
    icon iconset appicon mimeicon mimetype filesystem application theme webpage button
    flag signalflag semaphore sign roadsign symbol symboll simbolo simbol
    logo emblem badge award certificate
    map mapsym coastline globe network networksym dvb voip weathersym musicsym
    flowchart diagram chart graph blueprint
    pattern border bordered frame flourish ornament texture wallpaper background gradient
    text font letter alphabet number kanji
    arrow arrowshape shape geometry abstract magick callout jigsaw puzzle
    smiley stickman card example tatoo tattoo folder rule bullethole pointer cursor powered pinout
    """.split()
)

# Titles naming a whole collection ("Clipart by Nicu Buculei - pear" on ten different fruits) give
# no labels.
COLLECTION_TITLE = re.compile(r"clip ?arts?|collection|theme|iconset|s[iu]bmission", re.I)

# --------------------------------------------------------------------------------------------------
# Metadata and tags
# --------------------------------------------------------------------------------------------------

_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)
_LICENSE = re.compile(r'<cc:license rdf:resource="([^"]*)"')
PUBLIC_DOMAIN = {
    "http://web.resource.org/cc/PublicDomain",
    "http://creativecommons.org/licenses/publicdomain/",
}
_WORD = re.compile(r"[a-z]+")


def read_metadata(svg: Path) -> tuple[str, list[str], str]:
    """Title, keywords and licence URL of an SVG's `cc:Work` RDF block (empty when absent)."""
    text = svg.read_text(encoding="utf-8", errors="replace")
    work = _WORK.search(text)
    if not work:
        return "", [], ""
    block = work.group(0)
    title, subject, license_ = _TITLE.search(block), _SUBJECT.search(block), _LICENSE.search(block)
    items = _LI.findall(subject.group(1)) if subject else []
    if subject and not items:
        items = [re.sub(r"<[^>]+>", " ", subject.group(1))]
    title_text = html.unescape(title.group(1)) if title else ""
    return title_text, [html.unescape(s) for s in items], license_.group(1) if license_ else ""


def singular(word: str) -> str:
    """Singularise simple English plurals."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


def tokenize(text: str) -> set[str]:
    """Lower-cased, singularised words of a tag or title, with known phrases joined first."""
    text = " ".join(_WORD.findall(text.lower()))
    text = " ".join(singular(w) for w in text.split())
    for phrase, joined in PHRASES.items():
        text = re.sub(rf"\b{phrase}\b", joined, text)
    return set(text.split())


def close_labels(labels: Iterable[str]) -> set[str]:
    """Add every is-a ancestor of the given labels."""
    out = set()
    for label in labels:
        while label and label not in out:
            out.add(label)
            label = PARENTS.get(label)
    return out


def labels_of(tokens: set[str]) -> set[str]:
    """Allow-listed labels named by a set of tokens, minus vetoed ones, closed under is-a."""
    named = {SYNONYMS.get(t, t) for t in tokens}
    return close_labels(n for n in named if n in ALLOWED and not (VETO.get(n, set()) & tokens))


# --------------------------------------------------------------------------------------------------
# Collecting pictures
# --------------------------------------------------------------------------------------------------


@dataclass
class Picture:
    png: Path  # resolved path of the PNG
    # relative SVG paths (copies in several categories)
    svgs: list[str] = field(default_factory=list)
    # words of the keywords and of a non-collection title
    tokens: set[str] = field(default_factory=set)
    # every word, collection titles and file names included (deny-list)
    words: set[str] = field(default_factory=set)
    public_domain: bool = True  # every SVG copy declares a public-domain licence
    labels: set[str] = field(default_factory=set)
    image: Image.Image | None = None
    thumb: np.ndarray | None = None  # 32 x 32 RGB of `image`, flattened

    @property
    def name(self) -> str:
        """Relative output path of the JPEG: the first SVG copy's path, sanitised."""
        stem = re.sub(r"[^a-z0-9/_-]+", "_", Path(self.svgs[0]).with_suffix("").as_posix().lower())
        return f"{stem}.jpg"

    @property
    def stem_key(self) -> str:
        """The file name without its black-and-white marker: a drawing and its B&W copy share it."""
        words = re.split(r"[^a-z0-9]+", Path(self.svgs[0]).stem.lower())
        return "_".join(w for w in words if w and w != "bw")


def collect(svg_root: Path, png_root: Path) -> list[Picture]:
    """One Picture per distinct PNG, with the tags of all its SVG copies merged."""
    by_png: dict[str, Picture] = {}
    for svg in sorted(svg_root.rglob("*.svg")):
        if svg.is_symlink():
            continue
        rel = svg.relative_to(svg_root)
        png = png_root / rel.with_suffix(".png")
        if not png.exists():
            continue
        title, keywords, license_ = read_metadata(svg)
        pic = by_png.setdefault(os.path.realpath(png), Picture(Path(os.path.realpath(png))))
        pic.svgs.append(rel.as_posix())
        for text in keywords if COLLECTION_TITLE.search(title) else [title, *keywords]:
            pic.tokens |= tokenize(text)
        pic.words |= pic.tokens | tokenize(title) | tokenize(re.sub(r"[_.-]", " ", rel.stem))
        pic.public_domain &= license_ in PUBLIC_DOMAIN
    return list(by_png.values())


def keep(pic: Picture) -> bool:
    """True for a public-domain, non-denied picture that names at least one allow-listed label."""
    pic.labels = labels_of(pic.tokens)
    return pic.public_domain and bool(pic.labels) and not (pic.words & DENY)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def render(png: Path, size: int) -> Image.Image | None:
    """RGB square: on white, cropped to its content, padded with white, resized to `size`."""
    with Image.open(png) as im:
        rgba = im.convert("RGBA")
    if max(rgba.size) > 4 * size:
        rgba = rgba.reduce(max(rgba.size) // (4 * size))
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(canvas, rgba).convert("RGB")
    ink = np.asarray(rgb).min(axis=2) < 245
    if ink.sum() < 0.002 * ink.size:
        return None
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    box = rgb.crop((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
    side = round(max(box.size) * 1.06)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(box, ((side - box.width) // 2, (side - box.height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def thumbnail(image: Image.Image) -> np.ndarray:
    """32 x 32 RGB thumbnail, flattened, for near-duplicate search."""
    return np.asarray(image.resize((32, 32), Image.Resampling.BOX), dtype=np.float32).ravel()


def merge_duplicates(
    pics: list[Picture], tol: float = 0.5, same_name_tol: float = 8.0
) -> list[Picture]:
    """Merge pictures that look the same; the first one keeps the tags of all.

    Same means a mean absolute thumbnail difference below `tol`, or below `same_name_tol` for equal
    file names (one drawing filed, and rendered slightly differently, in two categories).
    """
    out: list[Picture] = []
    thumbs = np.empty((len(pics), 32 * 32 * 3), dtype=np.float32)
    for pic in pics:
        diff = np.abs(thumbs[: len(out)] - pic.thumb).mean(axis=1)
        same_name = np.array([o.png.name == pic.png.name for o in out], dtype=bool)
        twins = np.flatnonzero((diff < tol) | (same_name & (diff < same_name_tol)))
        if twins.size == 0:
            thumbs[len(out)] = pic.thumb
            out.append(pic)
            continue
        twin = out[twins[0]]
        twin.svgs += pic.svgs
        twin.tokens |= pic.tokens
        twin.words |= pic.words
        twin.public_domain &= pic.public_domain
    return [pic for pic in out if keep(pic)]


def split_groups(pics: list[Picture], tol: float = 3.0) -> dict[str, str]:
    """Picture name -> group name; near-identical pictures (variants, B&W copies) share a group so
    that they land on the same side of the train/test split."""
    parent = list(range(len(pics)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    thumbs = np.stack([pic.thumb for pic in pics])
    first_of_key: dict[str, int] = {}
    for i, pic in enumerate(pics):
        similar = np.flatnonzero(np.abs(thumbs[:i] - pic.thumb).mean(axis=1) < tol).tolist()
        for j in [*similar, first_of_key.setdefault(pic.stem_key, i)]:
            parent[root(i)] = root(j)
    return {pic.name: pics[root(i)].name for i, pic in enumerate(pics)}


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Vocabulary and splits
# --------------------------------------------------------------------------------------------------


def choose_vocabulary(pics: list[Picture], min_count: int) -> list[str]:
    """Labels of at least `min_count` pictures, most frequent first; pictures keep only those."""
    counts = Counter(label for pic in pics for label in pic.labels)
    vocab = sorted(
        (label for label, n in counts.items() if n >= min_count), key=lambda x: (-counts[x], x)
    )
    for pic in pics:
        pic.labels &= set(vocab)
    return vocab


def thin(pics: list[Picture], max_images: int, floor: int, seed: int) -> list[Picture]:
    """Drop seeded-random pictures whose labels all have over `floor` pictures, to `max_images`."""
    counts = Counter(label for pic in pics for label in pic.labels)
    dropped: set[str] = set()
    order = list(pics)
    random.Random(seed).shuffle(order)
    for pic in order:
        if len(pics) - len(dropped) <= max_images:
            break
        if all(counts[label] > floor for label in pic.labels):
            counts.subtract(pic.labels)
            dropped.add(pic.name)
    return [pic for pic in pics if pic.name not in dropped]


def split_labels(
    pics: list[Picture], vocab: Sequence[str], unseen_fraction: float, max_share: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded random seen/unseen partition (each keeps the vocabulary's order).

    Labels on more than `max_share` of the pictures (food, animal, person, ...) stay seen: an unseen
    label of that size would empty much of the training set, whose pictures need a seen positive.
    """
    counts = Counter(label for pic in pics for label in pic.labels)
    eligible = [v for v in vocab if counts[v] <= max_share * len(pics)]
    random.Random(seed).shuffle(eligible)
    unseen = set(eligible[: round(len(vocab) * unseen_fraction)])
    return [v for v in vocab if v not in unseen], [v for v in vocab if v in unseen]


def split_pictures(
    pics: list[Picture], seen: Sequence[str], test_fraction: float, min_test: int, seed: int
) -> set[str]:
    """Grouped iterative stratification: names of the test pictures.

    Groups (variants of a drawing, see `split_groups`) go to one side. Groups without a seen label
    go to test (training could not use them). The others are placed rarest label first, each on the
    side whose per-label targets (test: max(min_test, fraction * count)) are furthest from being
    met.
    """
    groups: dict[str, list[Picture]] = defaultdict(list)
    group_of = split_groups(pics)
    for pic in pics:
        groups[group_of[pic.name]].append(pic)
    counts = Counter(label for pic in pics for label in pic.labels)
    want_test = {label: max(min_test, round(test_fraction * n)) for label, n in counts.items()}
    want_train = {label: n - want_test[label] for label, n in counts.items()}
    rng = random.Random(seed)
    order = sorted(
        groups,
        key=lambda g: (
            any(set(p.labels) & set(seen) for p in groups[g]),
            min(counts[lab] for p in groups[g] for lab in p.labels),
            rng.random(),
        ),
    )
    have = {True: Counter(), False: Counter()}  # True: test

    def need(labels: list[str], test: bool) -> float:
        want = want_test if test else want_train
        return sum(max(0, want[lab] - have[test][lab]) / max(1, want[lab]) for lab in labels)

    test_names: set[str] = set()
    for key in order:
        members = groups[key]
        labels = sorted(
            {lab for p in members for lab in p.labels}, key=lambda lab: (counts[lab], lab)
        )
        # The group's rarest label decides; the sum over all its labels breaks ties, then a seeded
        # coin.
        by_rarest = (
            (need(labels[:1], True), need(labels, True)),
            (need(labels[:1], False), need(labels, False)),
        )
        to_test = (
            not set(labels) & set(seen)
            or by_rarest[0] > by_rarest[1]
            or (by_rarest[0] == by_rarest[1] and rng.random() < test_fraction)
        )
        have[to_test].update(lab for p in members for lab in p.labels)
        if to_test:
            test_names |= {p.name for p in members}
    return test_names


def records(pics: Iterable[Picture], vocab: Sequence[str]) -> list[Record]:
    """Positives over `vocab`, the other `vocab` labels negative; drop pictures with no positive."""
    out = []
    for pic in pics:
        pos = [DISPLAY.get(v, v) for v in vocab if v in pic.labels]
        if pos:
            neg = [DISPLAY.get(v, v) for v in vocab if v not in pic.labels]
            out.append(Record(f"images/{pic.name}", tuple(pos), tuple(neg)))
    return out


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--svg-root",
        type=Path,
        default=SVG_ROOT,
        help="openclipart-svg files (default: %(default)s)",
    )
    p.add_argument(
        "--png-root",
        type=Path,
        default=PNG_ROOT,
        help="openclipart-png files (default: %(default)s)",
    )
    p.add_argument(
        "--out", type=Path, default=OUT_DIR, help="dataset directory (default: %(default)s)"
    )
    p.add_argument("--size", type=int, default=256, help="side of the square JPEGs in pixels")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    p.add_argument("--min-count", type=int, default=8, help="minimum pictures per label")
    p.add_argument("--min-test", type=int, default=3, help="minimum test positives per label")
    p.add_argument(
        "--max-images", type=int, default=900, help="thin frequent-label pictures down to this many"
    )
    p.add_argument(
        "--thin-floor",
        type=int,
        default=30,
        help="thinning keeps every label above this many pictures",
    )
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--unseen-fraction", type=float, default=0.25)
    p.add_argument(
        "--max-unseen-share", type=float, default=0.03, help="larger labels always stay seen"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def gather(args: argparse.Namespace) -> tuple[list[Picture], list[str]]:
    """Kept, rendered, de-duplicated pictures and the vocabulary."""
    pics = [pic for pic in collect(args.svg_root, args.png_root) if keep(pic)]
    for pic in pics:
        pic.image = render(pic.png, args.size)
        pic.thumb = None if pic.image is None else thumbnail(pic.image)
    pics = merge_duplicates([pic for pic in pics if pic.image is not None])
    vocab = choose_vocabulary(pics, args.min_count)
    pics = sorted((p for p in pics if p.labels), key=lambda p: p.name)
    return thin(pics, args.max_images, args.thin_floor, args.seed), vocab


def write_dataset(
    out: Path, pics: list[Picture], vocab: list[str], args: argparse.Namespace
) -> None:
    """Write the JPEGs, train.jsonl, test.jsonl, seen.txt and unseen.txt under `out`."""
    seen, unseen = split_labels(pics, vocab, args.unseen_fraction, args.max_unseen_share, args.seed)
    test_names = split_pictures(pics, seen, args.test_fraction, args.min_test, args.seed)
    train = records((p for p in pics if p.name not in test_names), seen)
    test = records((p for p in pics if p.name in test_names), vocab)
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    used = {r.image for r in train + test}
    for pic in pics:
        if f"images/{pic.name}" in used:
            path = out / "images" / pic.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(pic.image, args.quality))
    write_manifest(out / "train.jsonl", train)
    write_manifest(out / "test.jsonl", test)
    write_labels(out / "seen.txt", [DISPLAY.get(v, v) for v in seen])
    write_labels(out / "unseen.txt", [DISPLAY.get(v, v) for v in unseen])


def label_counts(out: Path, pics: list[Picture]) -> dict[str, tuple[str, int, int, int]]:
    """Label -> (seen/unseen, pictures with it in train + test, train positives, test positives)."""
    seen, unseen = read_vocabulary(out)
    train, test = read_manifest(out / "train.jsonl"), read_manifest(out / "test.jsonl")
    kept = {r.image for r in train + test}
    n_all = Counter(
        DISPLAY.get(lab, lab) for p in pics if f"images/{p.name}" in kept for lab in p.labels
    )
    n_train = Counter(label for r in train for label in r.positive)
    n_test = Counter(label for r in test for label in r.positive)
    kind = dict.fromkeys(seen, "seen") | dict.fromkeys(unseen, "unseen")
    return {
        label: (kind[label], n_all[label], n_train[label], n_test[label]) for label in seen + unseen
    }


def report(out: Path, counts: dict[str, tuple[str, int, int, int]]) -> None:
    """Print the per-label counts, the split sizes and the size of the written files."""
    n_train, n_test = (len(read_manifest(out / f)) for f in ("train.jsonl", "test.jsonl"))
    n_seen = sum(kind == "seen" for kind, *_ in counts.values())
    print(
        f"labels: {n_seen} seen, {len(counts) - n_seen} unseen; "
        f"images: {n_train} train, {n_test} test"
    )
    print(f"  {'label':20s} {'kind':6s} {'images':>6s} {'train+':>6s} {'test+':>6s}")
    for label, (kind, n_all, n_tr, n_te) in counts.items():
        print(f"  {label:20s} {kind:6s} {n_all:6d} {n_tr:6d} {n_te:6d}")
    n_all = [c[1] for c in counts.values()]
    print(f"images per label: min {min(n_all)}, max {max(n_all)}")
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix in {".jpg", ".jsonl", ".txt"}]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(files))).hexdigest()[:16]
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    print(f"{len(files)} files, {megabytes:.2f} MB, content sha256 {digest}")


def problems(
    counts: dict[str, tuple[str, int, int, int]], min_count: int, min_test: int
) -> list[str]:
    """Labels that break the sample's guarantees."""
    out = []
    for label, (kind, n_all, n_train, n_test) in counts.items():
        if n_all < min_count or n_test < min_test or (kind == "seen" and n_train == 0):
            out.append(f"{label}: {n_all} images, {n_train} train and {n_test} test positives")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    pics, vocab = gather(args)
    write_dataset(args.out, pics, vocab, args)
    counts = label_counts(args.out, pics)
    report(args.out, counts)
    bad = problems(counts, args.min_count, args.min_test)
    if bad:
        sys.exit("label(s) below the minimum counts:\n  " + "\n  ".join(bad))


if __name__ == "__main__":
    main()
