"""A synthetic multi-scale classification set, drawn with numpy and Pillow, as an ImageFolder tree.

    python -m train.synthetic --out data/synthetic --classes 10 --train 20000 --val 2000 --seed 0

Each image holds one object of its class on a cluttered background: a smooth colour field with
low-frequency blotches, thin random lines and curves (some drawn over the object) and pixel
noise. Seven classes are solid shapes (disc, ring, square, triangle, cross, star, crescent),
upright but tilted at random; three are textured patches (stripes, checkerboard, dots) in a
random ellipse.
Object colours are random, so only shape and texture tell the classes apart. The object's size
varies from about 10% to 90% of the image's shorter side, which is what makes scale jittering
and multi-scale evaluation matter (paper sections 3.1 and 4.2), and its position is biased
towards the centre as in photographs.

Images have varied sizes and aspect ratios: the shorter side is one of ``SHORT_SIDES`` and the
ratio one of ``ASPECT_RATIOS``, in landscape or portrait. Every ratio maps a shorter side to an
integer longer side, so after rescaling to a test scale Q the image size depends on its ratio
alone, and the dense evaluation can batch images of one ratio together.

Each image's pixels come from its own generator seeded with (seed, split, index), so the set is
identical for a seed whatever the number of processes. The tree is written into a staging folder
and renamed into place, with a ``synthetic.json`` manifest; running the same command again is a
no-op.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = (
    "disc",
    "ring",
    "square",
    "triangle",
    "cross",
    "star",
    "crescent",
    "stripes",
    "checkerboard",
    "dots",
)
SHORT_SIDES: tuple[int, ...] = (96, 120, 144)
# (numerator, denominator): 96, 120 and 144 are multiples of 24, so long = short * n / d is exact.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 2))
POSITION_SPREAD = 0.1
SPLITS = {"train": 0, "val": 1}
MANIFEST = "synthetic.json"
FORMAT_VERSION = 2
JPEG_QUALITY = 90


@dataclass(frozen=True)
class SyntheticConfig:
    """What determines the data set; stored in the manifest so a rerun can tell it is done."""

    classes: int = 10
    train: int = 20000
    val: int = 2000
    seed: int = 0
    min_size: float = 0.1
    max_size: float = 0.9
    clutter: int = 6
    noise: float = 6.0
    background_contrast: float = 0.4
    rotation: float = 20.0
    version: int = FORMAT_VERSION


# --- shapes: each draws a filled mask of circumradius r centred on (cx, cy) -----------------


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Vertices at the given radii, evenly spaced in angle, starting at ``angle``."""
    n = len(radii)
    return [
        (
            cx + r * math.cos(angle + 2 * math.pi * i / n),
            cy + r * math.sin(angle + 2 * math.pi * i / n),
        )
        for i, r in enumerate(radii)
    ]


def _disc(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)


def _ring(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    _disc(draw, cx, cy, r, angle)
    inner = 0.55 * r
    draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)


def _square(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    draw.polygon(_polygon(cx, cy, [r] * 4, angle), fill=255)


def _triangle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    draw.polygon(_polygon(cx, cy, [r] * 3, angle), fill=255)


def _cross(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    # A plus sign: twelve corners, arms of half-width 0.3 r reaching out to r.
    w = 0.3 * r
    corners = [
        (w, w),
        (r, w),
        (r, -w),
        (w, -w),
        (w, -r),
        (-w, -r),
        (-w, -w),
        (-r, -w),
        (-r, w),
        (-w, w),
        (-w, r),
        (w, r),
    ]
    c, s = math.cos(angle), math.sin(angle)
    draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=255)


def _star(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    draw.polygon(_polygon(cx, cy, [r, 0.42 * r] * 5, angle), fill=255)


def _crescent(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    _disc(draw, cx, cy, r, angle)
    dx, dy = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
    inner = 0.85 * r
    draw.ellipse((cx + dx - inner, cy + dy - inner, cx + dx + inner, cy + dy + inner), fill=0)


def _patch(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    # Textured classes fill an ellipse (axes r and 0.75 r, rotated): the texture is the class.
    points = [
        (r * math.cos(t), 0.75 * r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, False)
    ]
    c, s = math.cos(angle), math.sin(angle)
    draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in points], fill=255)


# Angle of each shape's upright pose (image y points down): a vertex up for the triangle and the
# star, edges horizontal for the square.
UPRIGHT = {"triangle": -math.pi / 2, "star": -math.pi / 2, "square": math.pi / 4}

SHAPES: dict[str, Callable[..., None]] = {
    "disc": _disc,
    "ring": _ring,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "star": _star,
    "crescent": _crescent,
    "stripes": _patch,
    "checkerboard": _patch,
    "dots": _patch,
}


# Texture periods as fractions of the patch radius: a few coarse elements across each patch, so
# that the textures stay apart when a small patch is seen at a small scale. Checks cover half the
# patch, dots an eighth: the two differ even when blurred.
TEXTURE_PERIODS = {"stripes": (0.45, 0.7), "checkerboard": (0.5, 0.7), "dots": (0.45, 0.65)}
DOT_RADIUS = 0.2  # of the period


def _texture(name: str, height: int, width: int, r: float, rng: np.random.Generator) -> np.ndarray:
    """A (H, W) boolean pattern for the textured classes, with period tied to the object's size."""
    low, high = TEXTURE_PERIODS[name]
    period = max(3.0, r * rng.uniform(low, high))
    theta = rng.uniform(0, math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u = (xs * math.cos(theta) + ys * math.sin(theta)) / period
    v = (-xs * math.sin(theta) + ys * math.cos(theta)) / period
    u += rng.uniform(0, 1)
    v += rng.uniform(0, 1)
    if name == "stripes":
        return (u % 1.0) < 0.5
    if name == "checkerboard":
        return ((np.floor(u) + np.floor(v)) % 2) == 0
    du, dv = (u % 1.0) - 0.5, (v % 1.0) - 0.5  # dots: one disc per grid cell
    return du * du + dv * dv < DOT_RADIUS**2


# --- backgrounds and clutter ----------------------------------------------------------------


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _background(height: int, width: int, contrast: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour field around a random base colour: a 2x2..4x4 grid of colours within
    ``contrast * 255`` of the base, upsampled bicubically; float (H, W, 3)."""
    gh, gw = rng.integers(2, 5, size=2)
    base = rng.uniform(0, 255, size=3)
    grid = base + (rng.uniform(-0.5, 0.5, size=(gh, gw, 3)) * 255 * contrast)
    grid = np.clip(grid, 0, 255).astype(np.uint8)
    field = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32)


def _clutter(image: Image.Image, count: int, rng: np.random.Generator) -> None:
    """Thin lines and open curves in random colours: edges that belong to no class."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(count):
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        line_width = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            x0, y0, x1, y1 = rng.uniform(0, 1, size=4) * [width, height, width, height]
            draw.line((x0, y0, x1, y1), fill=color, width=line_width)
        else:
            # A random walk with momentum: a wiggly open curve.
            x, y = rng.uniform(0, 1) * width, rng.uniform(0, 1) * height
            heading, points = rng.uniform(0, 2 * math.pi), []
            for _ in range(int(rng.integers(4, 10))):
                points.append((x, y))
                heading += rng.normal(0, 0.6)
                step = rng.uniform(0.04, 0.12) * min(width, height)
                x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            draw.line(points, fill=color, width=line_width)


def _contrasting_color(reference: float, rng: np.random.Generator) -> np.ndarray:
    """A random colour whose luminance differs from ``reference`` by at least 60 of 255."""
    for _ in range(100):
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        if abs(float(_luminance(color)) - reference) >= 60:
            return color
    return np.full(3, 255.0 if reference < 128 else 0.0, dtype=np.float32)


def _noise(shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """Pixel noise of standard deviation ``std``: triangular (the sum of two uniforms).

    Drawn from random bytes, which is several times faster than Gaussian samples.
    """
    count = int(np.prod(shape))
    pair = np.frombuffer(rng.bytes(2 * count), dtype=np.uint8).reshape(2, *shape)
    unit = (pair[0].astype(np.float32) + pair[1] - 255.0) / 255.0  # triangular on [-1, 1]
    return unit * np.float32(std * math.sqrt(6.0))


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): a shorter side from SHORT_SIDES, a ratio from ASPECT_RATIOS, either way up."""
    short = int(rng.choice(SHORT_SIDES))
    num, den = ASPECT_RATIOS[int(rng.integers(len(ASPECT_RATIOS)))]
    long = short * num // den
    return (long, short) if rng.random() < 0.5 else (short, long)


def draw_image(
    label: int, rng: np.random.Generator, config: SyntheticConfig
) -> tuple[Image.Image, dict]:
    """One image of class ``label`` and the facts of its object (size as a fraction, centre)."""
    name = CLASSES[label]
    width, height = image_size(rng)
    short = min(width, height)
    canvas = _background(height, width, config.background_contrast, rng)

    background = Image.fromarray(canvas.astype(np.uint8))
    _clutter(background, config.clutter, rng)  # behind the object
    canvas = np.asarray(background, dtype=np.float32)

    fraction = rng.uniform(config.min_size, config.max_size)  # object diameter / shorter side
    r = 0.5 * fraction * short
    # Centre near the middle (sd 10% of the shorter side, as in photographs, so that most random
    # training crops see the object), and most of the object inside the image.
    spread = POSITION_SPREAD * short
    cx = float(np.clip(width / 2 + rng.normal(0, spread), 0.8 * r, width - 0.8 * r))
    cy = float(np.clip(height / 2 + rng.normal(0, spread), 0.8 * r, height - 0.8 * r))
    # Upright shapes (a vertex or an edge up) tilted by up to +-rotation degrees; flips and the
    # crescent's random side give the mirror images.
    tilt = math.radians(rng.uniform(-config.rotation, config.rotation))
    angle = (
        UPRIGHT.get(name, 0.0)
        + tilt
        + (math.pi if rng.random() < 0.5 and name == "crescent" else 0)
    )
    if name in ("stripes", "checkerboard", "dots"):
        angle = rng.uniform(0, math.pi)  # texture patches: any orientation
    mask_image = Image.new("L", (width, height), 0)
    SHAPES[name](ImageDraw.Draw(mask_image), cx, cy, r, angle)
    mask = np.asarray(mask_image, dtype=np.float32)[..., None] / 255.0

    local = float(_luminance(canvas[mask[..., 0] > 0].mean(axis=0))) if mask.any() else 128.0
    color = _contrasting_color(local, rng)
    fill = np.broadcast_to(color, canvas.shape)
    if name in ("stripes", "checkerboard", "dots"):
        other = _contrasting_color(float(_luminance(color)), rng)
        pattern = _texture(name, height, width, r, rng)[..., None]
        fill = np.where(pattern, color, other)
    canvas = canvas * (1 - mask) + fill * mask

    foreground = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    _clutter(foreground, max(1, config.clutter // 4), rng)  # a few edges across the object
    pixels = np.asarray(foreground, dtype=np.float32)
    pixels = pixels + _noise(pixels.shape, config.noise, rng)
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    return image, {"fraction": float(fraction), "center": (cx / width, cy / height)}


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of process count and drawing order."""
    return np.random.default_rng([seed, SPLITS[split], index])


def label_of(index: int, classes: int) -> int:
    """Balanced classes: image ``index`` of a split belongs to class ``index % classes``."""
    return index % classes


def _write_chunk(job: tuple[str, str, int, int, dict]) -> int:
    root, split, start, stop, values = job
    config = SyntheticConfig(**values)
    names = CLASSES[: config.classes]
    for index in range(start, stop):
        label = label_of(index, config.classes)
        image, _ = draw_image(label, image_rng(config.seed, split, index), config)
        image.save(
            os.path.join(root, split, names[label], f"{index:06d}.jpg"), quality=JPEG_QUALITY
        )
    return stop - start


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(total, start + size)


def generate(out: Path, config: SyntheticConfig, workers: int | None = None, log=print) -> Path:
    """Write the data set into ``out`` (train/ and val/ ImageFolder trees) unless it is there.

    Raises ``FileExistsError`` when ``out`` holds something else (another seed or size).
    """
    out = Path(out)
    if not 1 <= config.classes <= len(CLASSES):
        raise ValueError(f"--classes must be between 1 and {len(CLASSES)}, got {config.classes}")
    if config.train < config.classes or config.val < config.classes:
        raise ValueError("--train and --val need at least one image per class")
    if not 0 < config.min_size <= config.max_size <= 1:
        raise ValueError("object sizes must satisfy 0 < --min-size <= --max-size <= 1")
    manifest = out / MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text()).get("config")
        if found == asdict(config):
            log(f"synthetic data set already in {out} (same settings): nothing to do")
            return out
        raise FileExistsError(
            f"{out} already holds a synthetic data set with other settings ({found}); "
            "remove it or choose another --out"
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; remove it or choose another --out")

    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-staging-", dir=out.parent))
    try:
        for split in SPLITS:
            for name in CLASSES[: config.classes]:
                (staging / split / name).mkdir(parents=True)
        jobs = [
            (str(staging), split, start, stop, asdict(config))
            for split, total in (("train", config.train), ("val", config.val))
            for start, stop in _chunks(total, 250)
        ]
        workers = workers or min(len(jobs), os.cpu_count() or 1)
        done = 0
        if workers == 1:
            results = map(_write_chunk, jobs)
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            results = pool.map(_write_chunk, jobs)
        for count in results:
            done += count
        if workers != 1:
            pool.shutdown()
        (staging / MANIFEST).write_text(
            json.dumps(
                {
                    "config": asdict(config),
                    "classes": list(CLASSES[: config.classes]),
                    "short_sides": SHORT_SIDES,
                    "aspect_ratios": ASPECT_RATIOS,
                },
                indent=2,
            )
            + "\n"
        )
        staging.chmod(0o755)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {done} images into {out} in {time.perf_counter() - started:.1f} s")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.synthetic",
        description="Draw the synthetic multi-scale data set (an ImageFolder tree).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = SyntheticConfig()
    parser.add_argument("--out", type=Path, required=True, help="folder to create (train/, val/)")
    parser.add_argument(
        "--classes",
        type=int,
        default=defaults.classes,
        help=f"number of classes, the first N of: {', '.join(CLASSES)}",
    )
    parser.add_argument("--train", type=int, default=defaults.train, help="training images")
    parser.add_argument("--val", type=int, default=defaults.val, help="validation images")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the whole set")
    parser.add_argument(
        "--min-size",
        type=float,
        default=defaults.min_size,
        help="smallest object diameter, as a fraction of the shorter side",
    )
    parser.add_argument(
        "--max-size",
        type=float,
        default=defaults.max_size,
        help="largest object diameter, as a fraction of the shorter side",
    )
    parser.add_argument(
        "--clutter",
        type=int,
        default=defaults.clutter,
        help="distracting lines and curves per image",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=defaults.noise,
        help="standard deviation of the pixel noise (of 255)",
    )
    parser.add_argument(
        "--background-contrast",
        type=float,
        default=defaults.background_contrast,
        help="spread of the background colours around their base colour (0-1)",
    )
    parser.add_argument(
        "--rotation",
        type=float,
        default=defaults.rotation,
        help="shapes are tilted by up to this many degrees from upright",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes drawing images (default: all cores)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = SyntheticConfig(
        classes=args.classes,
        train=args.train,
        val=args.val,
        seed=args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
        clutter=args.clutter,
        noise=args.noise,
        background_contrast=args.background_contrast,
        rotation=args.rotation,
    )
    try:
        generate(args.out, config, args.workers, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
