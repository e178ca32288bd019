"""Diffusion-DPO's training pairs as the generator sees them: pairs of latents (in the layout its denoiser reads)
with their conditioning, from offline preference data (`PairLatents`, encoded once or cached) or ranked among the
policy's own samples (`build_preference_pairs`, `OnlineRound`). Any generator family: only the `GeneratorAdapter`
interface is called."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from reward.pairs import DatasetPairs
from rlhf.generators.base import GeneratorAdapter

PAIR_STRATEGIES = ("best_worst", "all")


@dataclass
class PairBatch:
    """Training pairs: `chosen` and `rejected` latents [B, ...] (the denoiser's layout: [B, C, h, w], FLUX packed
    [B, tokens, channels]) and conditioning for [chosen; rejected] (2B rows, chosen first), keys as the generator's
    `predict` reads them."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    conditioning: dict[str, torch.Tensor]


@dataclass
class OnlineRound:
    """One online round's samples on this process: final latents, conditioning rows (no negatives), images,
    prompts, rewards and per-perspective scores; and the pairs built from them."""

    prompts: list[str]
    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    images: torch.Tensor
    rewards: torch.Tensor
    perspectives: dict[str, torch.Tensor]
    pairs: list[tuple[int, int]]

    def batch(self, pair_indices: torch.Tensor) -> PairBatch:
        chosen = torch.tensor([self.pairs[i][0] for i in pair_indices.tolist()])
        rejected = torch.tensor([self.pairs[i][1] for i in pair_indices.tolist()])
        chosen, rejected = chosen.to(self.latents.device), rejected.to(self.latents.device)
        conditioning = {key: value[torch.cat([chosen, rejected])] for key, value in self.conditioning.items()}
        return PairBatch(self.latents[chosen], self.latents[rejected], conditioning)


def build_preference_pairs(
    rewards: torch.Tensor, group_size: int, strategy: str = "best_worst", margin: float = 0.0
) -> list[tuple[int, int]]:
    """(chosen, rejected) indices within consecutive groups of `group_size` samples of one prompt.

    "best_worst": the highest against the lowest reward of each group (the first of equals); "all": every pair of
    the group. A pair needs a reward gap above `margin`; non-finite rewards are never paired.
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"pair_strategy: expected one of {PAIR_STRATEGIES}, got {strategy!r}")
    values = rewards.detach().double().cpu().tolist()
    pairs = []
    for start in range(0, len(values), group_size):
        members = [i for i in range(start, min(start + group_size, len(values))) if math.isfinite(values[i])]
        if strategy == "best_worst":
            ranked = sorted(members, key=lambda i: -values[i])  # stable: the first of equal rewards ranks first
            candidates = [(ranked[0], ranked[-1])] if members else []
        else:
            candidates = [
                (i, j) if values[i] >= values[j] else (j, i) for k, i in enumerate(members) for j in members[k + 1 :]
            ]
        pairs += [(c, r) for c, r in candidates if values[c] - values[r] > margin]
    return pairs


def preprocess_image(image: Image.Image, resolution: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """RGB image -> float CHW in [-1, 1], shorter side resized to `resolution` and centre-cropped square; and its
    SDXL size conditioning (original height, width, crop top, crop left)."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    resized = image.resize(size, Image.Resampling.BICUBIC) if size != (width, height) else image
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    tensor = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    return tensor, (height, width, top, left)


def _image_identity(ref: Any) -> str:
    if ref.path is not None:
        return f"{ref.path}:{ref.path.stat().st_size}"
    data = ref.data if ref.data is not None else ref.image.tobytes()
    return hashlib.sha1(data).hexdigest()


class PairLatents:
    """Offline pairs as latents (the generator's `encode_images`: the VAE posterior's mode, so the same image
    always gives the same latents): encoded batch by batch as training asks, or all at once into `cache_dir` as
    float16 memory-mapped arrays that later runs of the same pairs, resolution and model reuse (an interrupted
    encoding resumes).

    Args:
        pairs: `reward.data.PairExample`s.
        pipeline: the policy, any `GeneratorAdapter` (its VAE encodes, its text encoders condition).
        resolution: square image side in pixels.
        cache_dir: where to cache; None encodes on the fly.
        encode_batch_size: pairs per VAE call while caching.
    """

    def __init__(
        self,
        pairs: Sequence[Any],
        pipeline: GeneratorAdapter,
        resolution: int,
        cache_dir: str | Path | None = None,
        encode_batch_size: int = 8,
    ) -> None:
        if not pairs:
            raise ValueError("dataset: no usable preference pair")
        self.pairs, self.pipeline, self.resolution = pairs, pipeline, resolution
        self.latents: np.ndarray | None = None
        self.size_ids: np.ndarray | None = None
        if cache_dir:
            self._fill_cache(Path(cache_dir), encode_batch_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def prompts(self, limit: int) -> list[str]:
        """The prompts of the first `limit` pairs."""
        return [self.pairs[i].prompt for i in range(min(limit, len(self.pairs)))]

    @torch.no_grad()
    def encode(self, refs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> float32 latents [N, ...] on the pipeline's device, and size ids [N, 4]."""
        prepared = [preprocess_image(ref.load(), self.resolution) for ref in refs]
        latents = self.pipeline.encode_images(torch.stack([pixels for pixels, _ in prepared]))
        return latents, torch.tensor([ids for _, ids in prepared])

    def _fill_cache(self, directory: Path, batch_size: int) -> None:
        shape = (len(self.pairs), 2, *self.pipeline.latent_shape(1, self.resolution, self.resolution)[1:])
        identity = hashlib.sha256()
        if isinstance(self.pairs, DatasetPairs):
            identity.update(f"{self.pairs.dataset._fingerprint}\0{self.pairs.index}".encode())
        else:
            for pair in self.pairs:
                images = f"{_image_identity(pair.chosen)}\0{_image_identity(pair.rejected)}"
                identity.update(f"{pair.prompt}\0{images}\n".encode())
        fingerprint = {
            "model": self.pipeline.base_model,
            "resolution": self.resolution,
            "shape": list(shape),
            "scaling_factor": self.pipeline.vae.config.scaling_factor,
            "pairs": identity.hexdigest(),
        }
        record_path = directory / "cache.json"
        with PartialState().main_process_first():
            record = json.loads(record_path.read_text()) if record_path.is_file() else None
            if record is not None and record["fingerprint"] != fingerprint:
                raise ValueError(
                    f"latent_cache_dir: {directory} caches other pairs or another model/resolution; use another directory"
                )
            if PartialState().is_main_process and (record is None or record["encoded"] < len(self.pairs)):
                directory.mkdir(parents=True, exist_ok=True)
                mode = "r+" if record is not None else "w+"
                open_memmap = np.lib.format.open_memmap
                latents = open_memmap(directory / "latents.npy", mode=mode, dtype=np.float16, shape=shape)
                sizes = open_memmap(directory / "size_ids.npy", mode=mode, dtype=np.int32, shape=(shape[0], 2, 4))
                done = record["encoded"] if record is not None else 0
                for start in tqdm(range(done, len(self.pairs), batch_size), desc="encoding latents", unit="batch"):
                    chunk = [self.pairs[i] for i in range(start, min(start + batch_size, len(self.pairs)))]
                    encoded, ids = self.encode([p.chosen for p in chunk] + [p.rejected for p in chunk])
                    encoded, ids = encoded.cpu().view(2, len(chunk), *shape[2:]), ids.view(2, len(chunk), 4)
                    latents[start : start + len(chunk)] = encoded.transpose(0, 1).half().numpy()
                    sizes[start : start + len(chunk)] = ids.transpose(0, 1).numpy()
                    latents.flush(), sizes.flush()
                    record_path.write_text(json.dumps({"fingerprint": fingerprint, "encoded": start + len(chunk)}))
                del latents, sizes
        self.latents = np.load(directory / "latents.npy", mmap_mode="r")
        self.size_ids = np.load(directory / "size_ids.npy", mmap_mode="r")

    def batch(self, indices: Sequence[int]) -> PairBatch:
        """The pairs at `indices` as a `PairBatch` (prompts encoded now, SDXL size ids per image)."""
        indices = [int(i) for i in indices]
        pairs = [self.pairs[i] for i in indices]
        device = self.pipeline.device
        if self.latents is not None:
            order = np.argsort(indices)  # memory maps read fastest in order
            stored = torch.from_numpy(np.ascontiguousarray(self.latents[np.array(indices)[order]]))
            stored = stored[torch.from_numpy(np.argsort(order))].float().to(device)
            chosen, rejected = stored[:, 0], stored[:, 1]
            ids = torch.from_numpy(np.ascontiguousarray(self.size_ids[indices])).long()
            size_ids = torch.cat([ids[:, 0], ids[:, 1]])
        else:
            latents, size_ids = self.encode([p.chosen for p in pairs] + [p.rejected for p in pairs])
            chosen, rejected = latents.chunk(2)
        conditioning = self.pipeline.encode_prompt(
            [p.prompt for p in pairs], guidance=False, height=self.resolution, width=self.resolution
        )
        conditioning = {key: torch.cat([value, value]) for key, value in conditioning.items()}
        if "add_time_ids" in conditioning:
            target = torch.tensor([self.resolution, self.resolution]).expand(len(size_ids), 2)
            time_ids = torch.cat([size_ids, target], dim=1)
            conditioning["add_time_ids"] = time_ids.to(device, conditioning["add_time_ids"].dtype)
        return PairBatch(chosen, rejected, conditioning)
