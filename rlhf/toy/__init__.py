"""The toy world: coloured shapes on plain backgrounds, their prompts, preference data and pixel oracles.

Its truth is known, so generators and reward models can be judged on a CPU: the oracles read it back from pixels.
Oracles take float tensors BCHW in [0, 1] on any device and return float CPU tensors of shape [B].
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from rlhf.config import parse_config

IMAGE_SIZE = 32
# Shape colours are saturated and backgrounds neutral, so every pixel has one unambiguous nearest palette colour.
TOY_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.75),
}
TOY_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TOY_BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
}
# The "forbidden" mark of the safety perspective: a cyan X, a colour no prompt asks for.
MARK_COLOUR: tuple[float, float, float] = (0.0, 0.90, 0.90)
# Every word a toy prompt uses; the tiny tokenizer gives each its own token.
TOY_VOCABULARY: tuple[str, ...] = ("a", "on", "background", *TOY_COLOURS, *TOY_SHAPES, *TOY_BACKGROUNDS)
# One prompt per colour x shape; backgrounds rotate so that no shape is tied to one background.
EVAL_PROMPTS: list[str] = [
    f"a {colour} {shape} on a {list(TOY_BACKGROUNDS)[(ci + si) % len(TOY_BACKGROUNDS)]} background"
    for (ci, colour), (si, shape) in itertools.product(enumerate(TOY_COLOURS), enumerate(TOY_SHAPES))
]

# Every colour x shape x background: evaluations whose per-seed means must vary little between seeds
ALL_PROMPTS: list[str] = [
    f"a {colour} {shape} on a {background} background"
    for colour, shape, background in itertools.product(TOY_COLOURS, TOY_SHAPES, TOY_BACKGROUNDS)
]

SHAPE_SIZE_RANGE = (14.0, 22.0)  # side of the shape's bounding box, pixels; 8x8 latents blur smaller ones
COLOUR_JITTER = 0.04  # per-channel uniform jitter of every drawn colour
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down, for anti-aliased edges
# Oracle thresholds (see the oracle docstrings): a pixel belongs to its nearest palette colour when within
# PALETTE_RADIUS; a colour is present when it covers MIN_COLOUR_FRACTION of the image (the smallest
# drawn shape covers about 10%); a shape is recognised when its best template overlaps it with IoU >= MIN_SHAPE_IOU.
PALETTE_RADIUS = 0.3
MIN_COLOUR_FRACTION = 0.02
MIN_SHAPE_IOU = 0.5
MIN_MARK_PIXELS = 8
COLOUR_SCORE_SIGMA = 0.2
COLOUR_SCORE_HALF = 0.05  # soft fraction at which colour_score is 0.5
FIDELITY_TOLERANCE = 0.1


@dataclasses.dataclass(frozen=True)
class ToyScene:
    """Everything needed to draw one toy image: what is drawn, where, and the colour jitter."""

    colour: str
    shape: str
    background: str
    centre_x: float
    centre_y: float
    size: float
    colour_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    background_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    mark: tuple[float, float] | None = None  # centre of the forbidden mark, if any

    @property
    def prompt(self) -> str:
        return toy_prompt(self.colour, self.shape, self.background)


def toy_prompt(colour: str, shape: str, background: str) -> str:
    """The caption of a scene: "a red circle on a white background"."""
    return f"a {colour} {shape} on a {background} background"


def parse_prompt(prompt: str) -> tuple[str, str]:
    """The (colour, shape) a prompt names: its first toy colour word and first toy shape word."""
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = next((w for w in words if w in TOY_COLOURS), None)
    shape = next((w for w in words if w in TOY_SHAPES), None)
    if colour is None or shape is None:
        raise ValueError(
            f"prompt {prompt!r} must name a toy colour {list(TOY_COLOURS)} and a toy shape {list(TOY_SHAPES)}"
        )
    return colour, shape


def toy_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` random toy prompts, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    return [
        toy_prompt(
            rng.choice(list(TOY_COLOURS)), rng.choice(TOY_SHAPES), rng.choice(list(TOY_BACKGROUNDS))
        )
        for _ in range(n)
    ]


def random_scene(
    rng: np.random.Generator,
    colour: str | None = None,
    shape: str | None = None,
    background: str | None = None,
    mark: bool = False,
) -> ToyScene:
    """A scene with random placement and jitter; unspecified colour, shape or background are drawn at random."""
    size = float(rng.uniform(*SHAPE_SIZE_RANGE))
    margin = size / 2 + 2
    centre_x, centre_y = (float(v) for v in rng.uniform(margin, IMAGE_SIZE - margin, size=2))
    return ToyScene(
        colour=colour or str(rng.choice(list(TOY_COLOURS))),
        shape=shape or str(rng.choice(TOY_SHAPES)),
        background=background or str(rng.choice(list(TOY_BACKGROUNDS))),
        centre_x=centre_x,
        centre_y=centre_y,
        size=size,
        colour_offset=tuple(float(v) for v in rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)),
        background_offset=tuple(float(v) for v in rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)),
        mark=tuple(float(v) for v in rng.uniform(5, IMAGE_SIZE - 5, 2)) if mark else None,
    )


def _shape_mask(shape: str, xs: torch.Tensor, ys: torch.Tensor, cx, cy, size) -> torch.Tensor:
    """Inside-test of a shape whose bounding box (side `size`) is centred on (cx, cy); broadcasts."""
    half = size / 2
    if shape == "circle":
        return ((xs - cx) ** 2 + (ys - cy) ** 2) <= half**2
    if shape == "square":
        return ((xs - cx).abs() <= half) & ((ys - cy).abs() <= half)
    if shape == "triangle":  # apex up, base at the bottom, base width = height
        depth = ys - (cy - half)
        return (depth >= 0) & (ys <= cy + half) & ((xs - cx).abs() <= depth / 2)
    raise ValueError(f"shape must be one of {list(TOY_SHAPES)}, got {shape!r}")


def _mark_mask(xs: torch.Tensor, ys: torch.Tensor, cx: float, cy: float) -> torch.Tensor:
    arm, thickness = 4.0, 1.0  # an 8 px X drawn with 2 px strokes
    dx, dy = xs - cx, ys - cy
    inside = (dx.abs() <= arm) & (dy.abs() <= arm)
    return inside & (((dx - dy).abs() <= thickness * 2**0.5) | ((dx + dy).abs() <= thickness * 2**0.5))


def _subpixel_grid() -> tuple[torch.Tensor, torch.Tensor]:
    steps = (torch.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    return steps.view(1, -1), steps.view(-1, 1)


def draw_scenes(scenes: Sequence[ToyScene]) -> torch.Tensor:
    """Scenes as one float tensor BCHW in [0, 1], 32x32, with anti-aliased edges."""
    chunk = 256  # the 4x supersampled canvas of many scenes at once would take gigabytes
    if len(scenes) > chunk:
        return torch.cat([draw_scenes(scenes[i : i + chunk]) for i in range(0, len(scenes), chunk)])
    xs, ys = _subpixel_grid()

    def per_scene(values: Sequence) -> torch.Tensor:  # B x C x 1 x 1, to broadcast over the grid
        return torch.tensor(values, dtype=torch.float32).view(len(scenes), -1, 1, 1)

    cx, cy, size = (per_scene([getattr(s, name) for s in scenes])[:, 0] for name in ("centre_x", "centre_y", "size"))
    background = per_scene([TOY_BACKGROUNDS[s.background] for s in scenes]) + per_scene(
        [s.background_offset for s in scenes]
    )
    colour = per_scene([TOY_COLOURS[s.colour] for s in scenes]) + per_scene([s.colour_offset for s in scenes])
    inside = torch.zeros(len(scenes), IMAGE_SIZE * SUPERSAMPLE, IMAGE_SIZE * SUPERSAMPLE)
    for shape in TOY_SHAPES:
        drawn = torch.tensor([s.shape == shape for s in scenes])
        if drawn.any():
            inside[drawn] = _shape_mask(shape, xs, ys, cx[drawn], cy[drawn], size[drawn]).float()
    inside = inside.unsqueeze(1)
    images = background * (1 - inside) + colour * inside
    for index, scene in enumerate(scenes):
        if scene.mark is not None:
            marked = _mark_mask(xs, ys, *scene.mark).float()
            images[index] = images[index] * (1 - marked) + torch.tensor(MARK_COLOUR).view(3, 1, 1) * marked
    return F.avg_pool2d(images, SUPERSAMPLE).clamp(0, 1)


def draw_scene(scene: ToyScene) -> torch.Tensor:
    """One scene as a float tensor CHW in [0, 1]."""
    return draw_scenes([scene])[0]


def sample_toy_images(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """`n` random clean toy images (BCHW in [0, 1]) and their captions, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return draw_scenes(scenes), [scene.prompt for scene in scenes]


# ---------------------------------------------------------------- corruptions (the fidelity perspective)

CORRUPTIONS: tuple[str, ...] = ("noise", "blur", "blocking")


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(np.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(image.unsqueeze(0), (radius, radius, radius, radius), mode="replicate")
    channels = image.shape[0]
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return blurred.squeeze(0)


def corrupt(image: torch.Tensor, kind: str, rng: np.random.Generator) -> torch.Tensor:
    """A corrupted copy of a CHW image: "noise" (Gaussian), "blur" (Gaussian) or "blocking".

    Blocking imitates heavy JPEG: each 4x4 or 8x8 block is flattened to its mean, plus a quantisation error.
    """
    if kind == "noise":
        sigma = rng.uniform(0.06, 0.15)
        noise = torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
        return (image + sigma * noise).clamp(0, 1)
    if kind == "blur":
        return _gaussian_blur(image, float(rng.uniform(0.8, 1.5))).clamp(0, 1)
    if kind == "blocking":
        block = int(rng.choice([4, 8]))
        means = F.avg_pool2d(image.unsqueeze(0), block)
        error = torch.from_numpy(rng.uniform(-0.06, 0.06, means.shape).astype(np.float32))
        return F.interpolate(means + error, scale_factor=block, mode="nearest").squeeze(0).clamp(0, 1)
    raise ValueError(f"corruption kind must be one of {list(CORRUPTIONS)}, got {kind!r}")


# ---------------------------------------------------------------- oracles


def _check_images(images: torch.Tensor, prompts: Sequence[str] | None = None) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor BCHW with 3 channels in [0, 1], got {shape}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")


def _oracle_pixels(images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
    """Checked images as a float CPU tensor: the oracles are cheap at toy sizes and answer on the CPU."""
    _check_images(images, prompts)
    return images.detach().float().cpu()


_PALETTE_NAMES: tuple[str, ...] = (*TOY_COLOURS, *TOY_BACKGROUNDS, "mark")
_PALETTE = torch.tensor([*TOY_COLOURS.values(), *TOY_BACKGROUNDS.values(), MARK_COLOUR])


def _palette_labels(images: torch.Tensor) -> torch.Tensor:
    """Index into the palette of each pixel's nearest colour (B x H x W), -1 where none is within PALETTE_RADIUS."""
    distances = torch.cdist(images.permute(0, 2, 3, 1).reshape(-1, 3), _PALETTE)
    nearest, labels = distances.min(dim=1)
    labels[nearest > PALETTE_RADIUS] = -1
    return labels.view(images.shape[0], images.shape[2], images.shape[3])


def _colour_masks(images: torch.Tensor, colours: Sequence[str]) -> torch.Tensor:
    labels = _palette_labels(images)
    wanted = torch.tensor([_PALETTE_NAMES.index(c) for c in colours]).view(-1, 1, 1)
    return (labels == wanted).float()


def _shape_scores(masks: torch.Tensor) -> torch.Tensor:
    """IoU (B x shapes) of each mask with each shape's template of the same area and centroid."""
    height, width = masks.shape[1:]
    ys = torch.arange(height, dtype=torch.float32).view(1, -1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, -1) + 0.5
    area = masks.sum(dim=(1, 2)).clamp(min=1e-6)
    cx = ((masks * xs).sum(dim=(1, 2)) / area).view(-1, 1, 1)
    cy = ((masks * ys).sum(dim=(1, 2)) / area).view(-1, 1, 1)
    area = area.view(-1, 1, 1)
    # the bounding-box side giving each shape the mask's area; the triangle's centroid sits size/6 below its box centre
    templates = {
        "circle": (cy, 2 * torch.sqrt(area / torch.pi)),
        "square": (cy, torch.sqrt(area)),
        "triangle": (cy - torch.sqrt(2 * area) / 6, torch.sqrt(2 * area)),
    }
    scores = []
    for shape in TOY_SHAPES:
        centre_y, size = templates[shape]
        template = _shape_mask(shape, xs, ys, cx, centre_y, size).float()
        intersection = torch.minimum(masks, template).sum(dim=(1, 2))
        union = torch.maximum(masks, template).sum(dim=(1, 2)).clamp(min=1e-6)
        scores.append(intersection / union)
    return torch.stack(scores, dim=1)


def _recognised_shape(masks: torch.Tensor) -> torch.Tensor:
    """Index into TOY_SHAPES of the shape each mask draws, -1 where it is too small or matches no shape."""
    best_iou, best = _shape_scores(masks).max(dim=1)
    present = masks.mean(dim=(1, 2)) >= MIN_COLOUR_FRACTION
    return torch.where(present & (best_iou >= MIN_SHAPE_IOU), best, torch.full_like(best, -1))


def _named_targets(prompts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The colour each prompt names, and the index into TOY_SHAPES of the shape it names."""
    colours, shapes = zip(*(parse_prompt(p) for p in prompts))
    return list(colours), torch.tensor([TOY_SHAPES.index(s) for s in shapes])


@torch.no_grad()
def oracle_colour(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """1.0 where the colour the prompt names covers at least MIN_COLOUR_FRACTION of the image, else 0.0."""
    images = _oracle_pixels(images, prompts)
    masks = _colour_masks(images, _named_targets(prompts)[0])
    return (masks.mean(dim=(1, 2)) >= MIN_COLOUR_FRACTION).float()


@torch.no_grad()
def oracle_shape(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """1.0 where the image's dominant shape colour draws the shape the prompt names, whatever its colour."""
    images = _oracle_pixels(images, prompts)
    labels = _palette_labels(images)
    counts = torch.stack([(labels == i).sum(dim=(1, 2)) for i in range(len(TOY_COLOURS))], dim=1)
    dominant = counts.argmax(dim=1).view(-1, 1, 1)
    recognised = _recognised_shape((labels == dominant).float())
    return (recognised == _named_targets(prompts)[1]).float()


@torch.no_grad()
def oracle_alignment(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """1.0 where the prompt's colour is present AND its pixels draw the prompt's shape, else 0.0.

    The shape is recognised by the best IoU between the colour's pixel mask and each shape's template
    of the same area and centroid (at least MIN_SHAPE_IOU).
    """
    images = _oracle_pixels(images, prompts)
    colours, wanted = _named_targets(prompts)
    recognised = _recognised_shape(_colour_masks(images, colours))
    return (recognised == wanted).float()


@torch.no_grad()
def oracle_fidelity(images: torch.Tensor) -> torch.Tensor:
    """How clean each image is, in [0, 1]: the soft fraction of pixels that sit on one of its two flat colours.

    A clean toy image is a background and a shape, each of one colour, with thin anti-aliased edges
    (about 0.95). Noise moves every pixel off its colour, blur widens the edges, blocking mixes colours
    across whole blocks: each lowers the score. The background is the median border pixel; the shape
    colour, the median of the pixels far from it.
    """
    images = _oracle_pixels(images)
    pixels = images.flatten(2)  # B x 3 x HW
    border = torch.cat(
        [images[:, :, 0], images[:, :, -1], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], dim=2
    )
    background = border.median(dim=2).values.unsqueeze(2)
    far = (pixels - background).norm(dim=1) > PALETTE_RADIUS
    scores = []
    for index in range(images.shape[0]):
        foreground_pixels = pixels[index][:, far[index]]
        foreground = (
            foreground_pixels.median(dim=1).values.unsqueeze(1) if far[index].any() else background[index]
        )
        distance = torch.minimum(
            (pixels[index] - background[index]).norm(dim=0), (pixels[index] - foreground).norm(dim=0)
        )
        scores.append(torch.exp(-((distance / FIDELITY_TOLERANCE) ** 2)).mean())
    return torch.stack(scores)


@torch.no_grad()
def oracle_safety(images: torch.Tensor) -> torch.Tensor:
    """1.0 (safe) unless at least MIN_MARK_PIXELS pixels have the forbidden mark's colour."""
    images = _oracle_pixels(images)
    labels = _palette_labels(images)
    mark_pixels = (labels == _PALETTE_NAMES.index("mark")).sum(dim=(1, 2))
    return (mark_pixels < MIN_MARK_PIXELS).float()


def colour_score(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """A differentiable colour reward in [0, 1): f / (f + COLOUR_SCORE_HALF), f the soft fraction of
    pixels near the prompt's colour (Gaussian in RGB distance, sigma COLOUR_SCORE_SIGMA).

    Gradients flow to the pixels; they are finite everywhere and non-zero for any real image.
    """
    _check_images(images, prompts)
    targets = torch.tensor(
        [TOY_COLOURS[parse_prompt(p)[0]] for p in prompts], dtype=images.dtype, device=images.device
    )
    squared_distance = ((images - targets.view(-1, 3, 1, 1)) ** 2).sum(dim=1)
    fraction = torch.exp(-squared_distance / (2 * COLOUR_SCORE_SIGMA**2)).mean(dim=(1, 2))
    return fraction / (fraction + COLOUR_SCORE_HALF)


@torch.no_grad()
def alignment_score(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """A dense form of `oracle_alignment` in [0, 1): `colour_score` times the IoU of the named colour's pixels
    with the named shape's template (0 where no pixel has that colour). Not differentiable: the mask is hard.

    A reward that is ground truth for alignment yet moves with every sample (the 0/1 oracle gives a group of
    identical rewards no advantage): it measures how far a trainer can lift oracle alignment with a perfect reward.
    """
    images = _oracle_pixels(images, prompts)
    colours, wanted = _named_targets(prompts)
    iou = _shape_scores(_colour_masks(images, colours))[torch.arange(len(prompts)), wanted]
    return colour_score(images, prompts) * iou


# ---------------------------------------------------------------- preference data


def _save_png(image: torch.Tensor, path: Path) -> None:
    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def _alignment_row(rng: np.random.Generator, save: Callable[[torch.Tensor, str], str]) -> dict:
    chosen = random_scene(rng)
    wrong = rng.choice(["colour", "shape", "both"])
    colour, shape = chosen.colour, chosen.shape
    if wrong in ("colour", "both"):
        colour = str(rng.choice([c for c in TOY_COLOURS if c != chosen.colour]))
    if wrong in ("shape", "both"):
        shape = str(rng.choice([s for s in TOY_SHAPES if s != chosen.shape]))
    rejected = random_scene(rng, colour=colour, shape=shape, background=chosen.background)
    return {
        "prompt": chosen.prompt,
        "chosen": save(draw_scene(chosen), "chosen"),
        "rejected": save(draw_scene(rejected), "rejected"),
        "rejected_error": str(wrong),
    }


def _fidelity_row(rng: np.random.Generator, save: Callable[[torch.Tensor, str], str]) -> dict:
    scene = random_scene(rng)
    clean = draw_scene(scene)
    kind = str(rng.choice(CORRUPTIONS))
    return {
        "prompt": scene.prompt,
        "chosen": save(clean, "chosen"),
        "rejected": save(corrupt(clean, kind, rng), "rejected"),
        "corruption": kind,
    }


def _safety_row(rng: np.random.Generator, save: Callable[[torch.Tensor, str], str]) -> dict:
    safe = bool(rng.random() < 0.5)
    scene = random_scene(rng, mark=not safe)
    return {"prompt": scene.prompt, "image": save(draw_scene(scene), "image"), "label": int(safe)}


PERSPECTIVES: dict[str, Callable[[np.random.Generator, Callable[[torch.Tensor, str], str]], dict]] = {
    "alignment": _alignment_row,
    "fidelity": _fidelity_row,
    "safety": _safety_row,
}


TOY_DATA_MANIFEST = "toy_data.json"  # the size and seed a toy data directory was written with


def write_toy_datasets(out: str | Path, n: int = 512, n_test: int = 128, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write the three perspectives' train/test JSONL files and PNG images under `out`.

    Layout: `out/{alignment,fidelity,safety}/{train,test}.jsonl`, images in `out/<perspective>/images/`,
    referenced by paths relative to the JSONL file, and `out/toy_data.json` (n, n_test, seed), so a config can
    tell whether the data is the one it asks for. Returns {perspective: {split: jsonl path}}.
    Deterministic from `seed`; the test split draws from its own stream, never from the train one.
    """
    if n < 1 or n_test < 1:
        raise ValueError(f"n and n_test must be positive, got n={n}, n_test={n_test}")
    out = Path(out)
    written: dict[str, dict[str, Path]] = {}
    total = len(PERSPECTIVES) * (n + n_test)
    with tqdm(total=total, desc="toy data", unit="row") as progress:
        for perspective_index, (perspective, make_row) in enumerate(PERSPECTIVES.items()):
            directory = out / perspective
            (directory / "images").mkdir(parents=True, exist_ok=True)
            written[perspective] = {}
            for split_index, (split, count) in enumerate((("train", n), ("test", n_test))):
                rng = np.random.default_rng([seed, perspective_index, split_index])
                rows = []
                for row_index in range(count):

                    def save(image: torch.Tensor, role: str) -> str:
                        relative = f"images/{split}_{row_index:05d}_{role}.png"
                        _save_png(image, directory / relative)
                        return relative

                    rows.append(make_row(rng, save))
                    progress.update(1)
                path = directory / f"{split}.jsonl"
                path.write_text("".join(json.dumps(row) + "\n" for row in rows))
                written[perspective][split] = path
    (out / TOY_DATA_MANIFEST).write_text(json.dumps({"n": n, "n_test": n_test, "seed": seed}))
    return written


def toy_data_size(out: str | Path) -> dict[str, int | None] | None:
    """What `write_toy_datasets` wrote into `out`: `{"n", "n_test", "seed"}` from its manifest; for data written
    before manifests existed, the row counts with `seed` None; None when a split file is missing."""
    out = Path(out)
    paths = {(p, split): out / p / f"{split}.jsonl" for p in PERSPECTIVES for split in ("train", "test")}
    if not all(path.is_file() for path in paths.values()):
        return None
    if (out / TOY_DATA_MANIFEST).is_file():
        return json.loads((out / TOY_DATA_MANIFEST).read_text())
    counts = {split: len(paths[next(iter(PERSPECTIVES)), split].read_text().splitlines()) for split in ("train", "test")}
    return {"n": counts["train"], "n_test": counts["test"], "seed": None}


@dataclasses.dataclass
class ToyDataConfig:
    """Arguments of `rlhf toy data`.

    out: directory to write into (required).
    n: rows per perspective in the train split (default 512).
    n_test: rows per perspective in the held-out test split (default 128).
    seed: random seed; the same seed writes the same files (default 0).
    """

    out: str = dataclasses.field(default="", metadata={"help": "Directory to write the toy datasets into."})
    n: int = dataclasses.field(default=512, metadata={"help": "Rows per perspective in the train split."})
    n_test: int = dataclasses.field(default=128, metadata={"help": "Rows per perspective in the test split."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Random seed."})


def data_main(argv: list[str]) -> int:
    """`rlhf toy data --out DIR [--n N] [--n_test N] [--seed S]`."""
    (config,) = parse_config(ToyDataConfig, argv)
    if not config.out:
        raise ValueError("--out is required: the directory to write the toy datasets into")
    written = write_toy_datasets(config.out, n=config.n, n_test=config.n_test, seed=config.seed)
    for perspective, splits in written.items():
        print(f"{perspective}: " + ", ".join(str(path) for path in splits.values()))
    return 0
