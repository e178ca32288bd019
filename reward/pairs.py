"""Preference pairs for Diffusion-DPO, read from files, saved `datasets` directories or the hub cache; they only
read data (turning them into latents needs the generator: `trainers.dpo_pairs`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from reward.data import BadRowWarning, load_preferences


def load_pairs(
    source: str, kind: str, split: str, image_root: str, check_images: bool, limit: int, field_name: str
) -> Sequence[Any]:
    """Preference pairs (`reward.data.PairExample`, ties dropped) from a .jsonl/.json/.parquet file (a list), or
    from a saved `datasets` directory or a hub dataset id read from the local cache (a `DatasetPairs`, which keeps
    the images in the dataset's memory-mapped files)."""
    path = Path(source)
    if path.is_file():
        data = load_preferences(path, kind=kind, image_root=image_root or None, ties="drop", check_images=check_images)
        return data.pairs[:limit] if limit else data.pairs
    if not path.is_dir() and (path.suffix in (".jsonl", ".json", ".parquet") or os.sep in source):
        raise FileNotFoundError(f"{field_name}: no such file or directory {source}")
    import datasets

    try:
        rows = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise FileNotFoundError(
            f"{field_name}: cannot read {source!r} as a file, dataset directory or hub id: {error}"
        ) from error
    if isinstance(rows, datasets.DatasetDict):
        if split not in rows:
            raise ValueError(f"{field_name}: split {split!r} not in {list(rows)}")
        rows = rows[split]
    return DatasetPairs(rows, kind, image_root, check_images, limit)


class DatasetPairs(Sequence):
    """The pairs of a `datasets.Dataset`, read row by row when asked, so that a dataset of encoded images (Pick-a-Pic
    v2: ~1M pairs) is never held in memory. One scan at construction indexes (row, pair within row) of every usable
    pair, in chunks; bad rows and ties are left out as `reward.data.load_preferences` leaves them out.

    Args:
        dataset: the rows. kind, image_root, check_images: as for `load_preferences`. limit: at most this many pairs
            (0 = all).
    """

    SCAN_ROWS = 256

    def __init__(self, dataset: Any, kind: str, image_root: str, check_images: bool, limit: int = 0) -> None:
        self.dataset, self.kind, self.image_root = dataset, kind, image_root or None
        self.index: list[tuple[int, int]] = []
        skipped = 0
        for start in tqdm(range(0, len(dataset), self.SCAN_ROWS), desc="indexing pairs", unit="chunk"):
            if limit and len(self.index) >= limit:
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BadRowWarning)
                try:
                    data = self._read(range(start, min(start + self.SCAN_ROWS, len(dataset))), check_images)
                except ValueError:  # no usable row in this chunk
                    continue
            skipped += len(data.skipped)
            within: dict[int, int] = {}
            for pair in data.pairs:
                within[pair.position] = within.get(pair.position, -1) + 1
                self.index.append((start + pair.position, within[pair.position]))
        self.index = self.index[:limit] if limit else self.index
        if skipped:
            warnings.warn(f"dataset: skipped {skipped} unusable rows", BadRowWarning, stacklevel=2)

    def _read(self, rows: Sequence[int], check_images: bool) -> Any:
        return load_preferences(
            self.dataset.select(rows), kind=self.kind, image_root=self.image_root, ties="drop", check_images=check_images
        )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> Any:
        row, within = self.index[position]
        return self._read([row], check_images=False).pairs[within]
