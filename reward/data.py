"""Preference data for training reward perspectives: image pairs and labelled images read from JSONL,
JSON, parquet, `datasets.Dataset` objects, the public layouts (ImageRewardDB, Pick-a-Pic v2, HPDv2) and the
official LLaVA-Reward data files (rated pairs, classification rows)."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

KINDS = ("auto", "pairs", "labels", "imagereward", "pickapic", "hpdv2", "llava_reward")
TIE_HANDLING = ("keep", "drop")
_OWN_LAYOUT = "pairs/labels"
_SHOWN_IN_WARNING = 5


class BadRowWarning(UserWarning):
    """Issued once per load when rows were skipped; its message has the count and the first few rows."""


@dataclass(frozen=True, repr=False)
class ImageRef:
    """One image, kept as a file path, encoded bytes or a PIL image until `load()` decodes it to RGB."""

    path: Path | None = None
    data: bytes | None = None
    image: Image.Image | None = None

    def load(self) -> Image.Image:
        """Decode the image and return it in RGB (a new image each call)."""
        if self.image is not None:
            return self.image.convert("RGB")
        with Image.open(self.path if self.path is not None else io.BytesIO(self.data)) as opened:
            return opened.convert("RGB")

    def __repr__(self) -> str:
        if self.path is not None:
            return f"ImageRef(path={str(self.path)!r})"
        if self.data is not None:
            return f"ImageRef(<{len(self.data)} bytes>)"
        return f"ImageRef(<PIL {self.image.mode} {self.image.size}>)"


@dataclass(frozen=True)
class PairExample:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) image.

    `tie` marks a pair the annotators judged equal (the order of its two images then means nothing);
    `position` is where it came from in the source (see `PreferenceData.position_unit`).
    `rejected_prompt` is the prompt the rejected image is scored against when the source gives it its own
    (LLaVA-Reward's two-prompt rows: `prompt` is then the chosen image's); None means `prompt`.
    `chosen_rating` / `rejected_rating` are the annotators' ratings when the source has them (LLaVA-Reward's
    `c_rate` / `r_rate`), as given.
    """

    prompt: str
    chosen: ImageRef
    rejected: ImageRef
    tie: bool = False
    position: int = -1
    rejected_prompt: str | None = None
    chosen_rating: float | None = None
    rejected_rating: float | None = None


@dataclass(frozen=True)
class LabelExample:
    """A prompt with one image and a binary label (1 = positive, e.g. safe; 0 = negative)."""

    prompt: str
    image: ImageRef
    label: int
    position: int = -1


class SkippedRow(NamedTuple):
    """A row left out of the data: where it was and why."""

    position: int
    reason: str


@dataclass
class PreferenceData:
    """What `load_preferences` read: usable pairs and labels, and the rows it skipped.

    `position_unit` is "line" (1-based line numbers, JSONL) or "row" (0-based row indices: JSON arrays,
    parquet, `datasets` objects, iterables of mappings); positions in `skipped` and on examples use it.
    """

    source: str
    kind: str
    position_unit: str
    rows_read: int = 0
    pairs: list[PairExample] = field(default_factory=list)
    labels: list[LabelExample] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)
    dropped_ties: int = 0

    def summary(self) -> dict[str, Any]:
        """Counts for logs and metrics files."""
        return {
            "source": self.source,
            "kind": self.kind,
            "rows_read": self.rows_read,
            "pairs": len(self.pairs),
            "tie_pairs": sum(pair.tie for pair in self.pairs),
            "dropped_ties": self.dropped_ties,
            "labels": len(self.labels),
            "skipped": len(self.skipped),
        }

    def describe_skipped(self, limit: int = _SHOWN_IN_WARNING) -> str:
        """The first `limit` skipped rows as one line of text."""
        shown = "; ".join(f"{self.position_unit} {row.position}: {row.reason}" for row in self.skipped[:limit])
        more = len(self.skipped) - limit
        return shown + (f"; ... and {more} more" if more > 0 else "")

    def __len__(self) -> int:
        return len(self.pairs) + len(self.labels)

    def __repr__(self) -> str:
        return f"PreferenceData({self.summary()})"


class _BadRow(Exception):
    """A row that cannot be used; the message is the reason reported to the user."""


_LayoutReader = Callable[["_Reader", Iterator[tuple[int, Any]]], None]


def load_preferences(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
    kind: str = "auto",
    *,
    image_root: str | os.PathLike | None = None,
    ties: str = "keep",
    check_images: bool = True,
    path_map: Mapping[str, str | os.PathLike] | None = None,
) -> PreferenceData:
    """Read preference data, skipping and reporting bad rows.

    Args:
        source: a `.jsonl`, `.json` (array of objects) or `.parquet` file; or a `datasets.Dataset` (or any
            iterable of mappings) with the same columns.
        kind: the row layout; "auto" (default) detects it from the first row's keys:
            - "pairs": `{"prompt", "chosen", "rejected"}` (optional `"tie": bool`);
            - "labels": `{"prompt", "image", "label"}` with label 0 or 1;
            - "imagereward": ImageRewardDB, one image per row (`prompt_id`, `prompt`, `rank`, `image_path`
              or `image`; lower rank is better, every ranked pair within a prompt is used), or one prompt per
              row (`prompt`, `generations`, `ranking`);
            - "pickapic": Pick-a-Pic v2 (`caption`, `jpg_0`, `jpg_1`, `label_0` in {0, 0.5, 1}; 0.5 is a tie);
            - "hpdv2": HPDv2 (`prompt`, `file_path` or `image_path` list, and `human_preference` (1 marks
              the preferred image) or `rank` (lower is better));
            - "llava_reward": the official LLaVA-Reward files: pairs `{"prompt", "chosen_path", "reject_path",
              "c_rate", "r_rate"}` (`prompt` a string, or `[chosen prompt, rejected prompt]`; the ratings are
              kept, equal ratings make a tie) and classification rows `{"path", "label", "prompt"}`; other keys
              (`prompt_id`, `category`, ...) are ignored.
            In "auto" mode a JSONL/JSON file whose rows are neither public layout may mix pair and label rows.
        image_root: directory that relative image paths are resolved against; defaults to the file's own
            directory, or the working directory for in-memory sources.
        ties: "keep" (default) keeps annotator ties as pairs with `tie=True`; "drop" leaves them out and
            counts them in `dropped_ties`.
        check_images: decode every image once now, so a corrupt file is skipped and reported here rather
            than failing mid-training; False only checks that image files exist.
        path_map: `{prefix: local folder}` for files whose image paths were written elsewhere (the official
            files name `/scr/...` paths): an image path that starts with `prefix` (whole path components) has
            it replaced by the folder; the longest matching prefix wins, and a relative result resolves against
            `image_root` like any relative path.

    Images may be paths, encoded bytes, PIL images or `{"bytes", "path"}` dicts (the `datasets` Image
    feature). Rows with a missing key, a value of the wrong type, a missing file or an undecodable image
    are skipped; one `BadRowWarning` gives their count and the first few positions and reasons.

    Raises:
        ValueError: `kind` or `ties` is not one of the allowed values, `path_map` is not a mapping of prefixes
            to folders, or no row of the source is usable (naming the first missing image file if one was).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if ties not in TIE_HANDLING:
        raise ValueError(f"ties must be one of {TIE_HANDLING}, got {ties!r}")
    prefixes = _path_prefixes(path_map)
    name, unit, default_root, rows, columns = _open_rows(source)
    root = Path(image_root) if image_root is not None else default_root
    if not columns:
        rows, columns = _peek_columns(rows)
    detected = _detect_kind(set(columns)) if kind == "auto" else kind
    data = PreferenceData(source=name, kind=detected, position_unit=unit)
    reader = _Reader(data, root, keep_ties=ties == "keep", check_images=check_images, prefixes=prefixes)
    _LAYOUTS[detected](reader, _counted(rows, data))
    if detected == _OWN_LAYOUT:
        data.kind = "pairs" if not data.labels else "labels" if not data.pairs else "pairs+labels"

    if not data.pairs and not data.labels:
        dropped = f", {data.dropped_ties} ties dropped" if data.dropped_ties else ""
        first_skipped = f"; {data.describe_skipped()}" if data.skipped else ""
        # a file whose images all miss was most likely written on another machine: say how to point it here
        missing = "" if reader.first_missing is None else (
            f". The first missing image file is {reader.first_missing}; if the file's image paths point "
            f"elsewhere, pass image_root (relative paths) or path_map={{'<prefix in the file>': '<local folder>'}}"
        )
        raise ValueError(
            f"no usable row in {name} (kind {detected!r}: {data.rows_read} rows read, "
            f"{len(data.skipped)} skipped{dropped}){first_skipped}{missing}"
        )
    if data.skipped:
        warnings.warn(
            f"{name}: skipped {len(data.skipped)} of {data.rows_read} rows ({data.describe_skipped()})",
            BadRowWarning,
            stacklevel=2,
        )
    return data


def _path_prefixes(path_map: Mapping[str, str | os.PathLike] | None) -> list[tuple[str, Path]]:
    """`path_map` validated, as (prefix without trailing separator, folder), longest prefix first."""
    if path_map is None:
        return []
    if not isinstance(path_map, Mapping):
        raise ValueError(f"path_map must map a path prefix to a local folder, got {type(path_map).__name__}")
    prefixes = []
    for prefix, folder in path_map.items():
        if not isinstance(prefix, (str, os.PathLike)) or not str(prefix) or not isinstance(folder, (str, os.PathLike)):
            raise ValueError(f"path_map: expected a non-empty path prefix -> a folder, got {prefix!r}: {folder!r}")
        prefixes.append((str(prefix).rstrip("/") or "/", Path(folder)))
    return sorted(prefixes, key=lambda item: len(item[0]), reverse=True)


def _peek_columns(rows: Iterator[tuple[int, Any]]) -> tuple[Iterator[tuple[int, Any]], Iterable[str]]:
    """The keys of the first row that is an object, and the rows with nothing consumed."""
    seen = []
    for position, row in rows:
        seen.append((position, row))
        if isinstance(row, Mapping):
            return itertools.chain(seen, rows), row.keys()
    return iter(seen), ()


def _counted(rows: Iterator[tuple[int, Any]], data: PreferenceData) -> Iterator[tuple[int, Any]]:
    for position, row in rows:
        data.rows_read += 1
        yield position, row


def _open_rows(source: Any) -> tuple[str, str, Path, Iterator[tuple[int, Any]], Iterable[str]]:
    """(name, position unit, default image root, (position, row) iterator, known column names)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"preference data file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return str(path), "line", path.parent, _jsonl_rows(path), ()
        if suffix == ".json":
            return str(path), "row", path.parent, _json_rows(path), ()
        if suffix == ".parquet":
            rows, columns = _parquet_rows(path)
            return str(path), "row", path.parent, rows, columns
        raise ValueError(f"preference data file must end in .jsonl, .json or .parquet, got {path}")
    if isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        columns = getattr(source, "column_names", None) or ()
        return type(source).__name__, "row", Path.cwd(), enumerate(source), columns
    raise TypeError(
        f"source must be a file path, a datasets.Dataset or an iterable of mappings, got {type(source).__name__}"
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_number, _BadRow(f"invalid JSON: {exc.msg}")


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); one object per line needs the .jsonl suffix") from exc
    if not isinstance(content, list):
        raise ValueError(f"{path} must hold a JSON array of objects, got {type(content).__name__}")
    return enumerate(content)


def _parquet_rows(path: Path) -> tuple[Iterator[tuple[int, Any]], list[str]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as exc:
        raise ImportError("reading parquet needs pyarrow (`pip install pyarrow`, or `datasets`)") from exc
    parquet_file = parquet.ParquetFile(path)

    def rows() -> Iterator[Any]:
        for batch in parquet_file.iter_batches(batch_size=256):
            yield from batch.to_pylist()

    return enumerate(rows()), list(parquet_file.schema_arrow.names)


def _detect_kind(columns: set[str]) -> str:
    if {"jpg_0", "jpg_1", "label_0"} <= columns:
        return "pickapic"
    if {"chosen_path", "reject_path"} <= columns or ({"path", "label"} <= columns and "image" not in columns):
        return "llava_reward"
    if "human_preference" in columns or ("rank" in columns and columns & {"file_path", "image_path"}
                                         and "prompt_id" not in columns):
        return "hpdv2"
    if {"prompt_id", "rank"} <= columns or {"generations", "ranking"} <= columns:
        return "imagereward"
    # our own layout: a file may mix pair rows and label rows, so each row is read by its own keys
    return _OWN_LAYOUT


class _Reader:
    """Turns rows into examples for one load: validates values, resolves and checks images, records skips."""

    def __init__(self, data: PreferenceData, root: Path, keep_ties: bool, check_images: bool,
                 prefixes: list[tuple[str, Path]]) -> None:
        self.data = data
        self.root = root
        self.keep_ties = keep_ties
        self.check_images = check_images
        self.prefixes = prefixes
        self.first_missing: Path | None = None
        # images shared by many pairs (ranked layouts) are decoded once
        self._checked_paths: dict[Path, str | None] = {}

    def each_row(self, rows: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, Mapping[str, Any]]]:
        """The rows that are objects; the others (invalid JSON, a bare value) are skipped here."""
        for position, row in rows:
            if isinstance(row, _BadRow):
                self.skip(position, str(row))
            elif not isinstance(row, Mapping):
                self.skip(position, f"wrong type: a row must be an object, got {type(row).__name__}")
            else:
                yield position, row

    def skip(self, position: int, reason: str) -> None:
        self.data.skipped.append(SkippedRow(position, reason))

    def add_pair(self, prompt: str, chosen: ImageRef, rejected: ImageRef, tie: bool, position: int,
                 **details: Any) -> None:
        """Keep a pair (unless it is a dropped tie); `details` are PairExample's optional fields."""
        if tie and not self.keep_ties:
            self.data.dropped_ties += 1
            return
        self.data.pairs.append(PairExample(prompt, chosen, rejected, tie=tie, position=position, **details))

    def add_ranked(self, prompt: str, images: list[ImageRef], scores: list[float], positions: list[int]) -> None:
        """Every pair of images with a known order; equal scores are ties. Higher score is better."""
        for i, j in itertools.combinations(range(len(images)), 2):
            better, worse = (i, j) if scores[i] >= scores[j] else (j, i)
            self.add_pair(prompt, images[better], images[worse], scores[i] == scores[j], positions[better])

    def image(self, row: Mapping[str, Any], key: str) -> ImageRef:
        return self.image_value(_require(row, key), key)

    def image_value(self, value: Any, what: str) -> ImageRef:
        if isinstance(value, Mapping) and {"bytes", "path"} & value.keys():
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (str, os.PathLike)):
            path = Path(self._mapped(os.fspath(value)))
            path = path if path.is_absolute() else self.root / path
            if not path.is_file():
                self.first_missing = self.first_missing or path
                raise _BadRow(f"missing file: {what} {path}")
            ref = ImageRef(path=path)
            if self.check_images:
                if path not in self._checked_paths:
                    self._checked_paths[path] = _decode_error(ref)
                error = self._checked_paths[path]
                if error is not None:
                    raise _BadRow(f"corrupt image: {what} {path} ({error})")
            return ref
        if isinstance(value, (bytes, bytearray)):
            ref = ImageRef(data=bytes(value))
            error = _decode_error(ref) if self.check_images else None
            if error is not None:
                raise _BadRow(f"corrupt image: {what} ({len(value)} bytes: {error})")
            return ref
        if isinstance(value, Image.Image):
            return ImageRef(image=value)
        raise _BadRow(f"wrong type: {what} must be a path, bytes or a PIL image, got {type(value).__name__}")

    def _mapped(self, value: str) -> str | Path:
        """`value` with its longest `path_map` prefix replaced by that prefix's folder (unchanged if none)."""
        for prefix, folder in self.prefixes:
            if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
                return folder / value[len(prefix):].lstrip("/")
        return value


def _decode_error(ref: ImageRef) -> str | None:
    try:
        ref.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _require(row: Mapping[str, Any], key: str) -> Any:
    if key not in row or row[key] is None:
        raise _BadRow(f"missing key {key!r}")
    return row[key]


def _text(row: Mapping[str, Any], key: str) -> str:
    value = _require(row, key)
    if not isinstance(value, str):
        raise _BadRow(f"wrong type: {key!r} must be a string, got {type(value).__name__}")
    return value


def _binary_label(row: Mapping[str, Any], key: str) -> int:
    value = _require(row, key)
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, (int, float)):
        raise _BadRow(f"wrong type: {key!r} must be 0 or 1, got {type(value).__name__}")
    if value not in (0, 1):
        raise _BadRow(f"bad value: {key!r} must be 0 or 1, got {value!r}")
    return int(value)


def _number_list(row: Mapping[str, Any], key: str, length: int) -> list[float]:
    values = _require(row, key)
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise _BadRow(f"wrong type: {key!r} must be a list of numbers")
    if len(values) != length:
        raise _BadRow(f"bad value: {key!r} has {len(values)} entries for {length} images")
    return [float(v) for v in values]


def _path_list(row: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, list[Any]]:
    key = next((k for k in keys if row.get(k) is not None), None)
    if key is None:
        raise _BadRow(f"missing key: one of {keys}")
    values = row[key]
    if not isinstance(values, (list, tuple)) or len(values) < 2:
        raise _BadRow(f"wrong type: {key!r} must be a list of at least two images")
    return key, list(values)


def _images(reader: _Reader, key: str, values: list[Any]) -> list[ImageRef]:
    return [reader.image_value(value, f"{key}[{index}]") for index, value in enumerate(values)]


def _read_pair(reader: _Reader, position: int, row: Mapping[str, Any]) -> None:
    prompt = _text(row, "prompt")
    tie = row.get("tie", False)
    if not isinstance(tie, bool):
        raise _BadRow(f"wrong type: 'tie' must be true or false, got {type(tie).__name__}")
    chosen, rejected = reader.image(row, "chosen"), reader.image(row, "rejected")
    reader.add_pair(prompt, chosen, rejected, tie, position)


def _read_label(reader: _Reader, position: int, row: Mapping[str, Any]) -> None:
    prompt = _text(row, "prompt")
    label = _binary_label(row, "label")
    reader.data.labels.append(LabelExample(prompt, reader.image(row, "image"), label, position))


def _per_row(read_one: Callable[[_Reader, int, Mapping[str, Any]], None]) -> _LayoutReader:
    """A layout reader that reads each row on its own, skipping the rows that raise `_BadRow`."""

    def read(reader: _Reader, rows: Iterable[tuple[int, Any]]) -> None:
        for position, row in reader.each_row(rows):
            try:
                read_one(reader, position, row)
            except _BadRow as exc:
                reader.skip(position, str(exc))

    return read


def _read_pair_or_label(reader: _Reader, position: int, row: Mapping[str, Any]) -> None:
    if row.keys() & {"chosen", "rejected"}:
        _read_pair(reader, position, row)
    elif row.keys() & {"image", "label"}:
        _read_label(reader, position, row)
    else:
        raise _BadRow("missing key: a pair needs 'chosen' and 'rejected', a label row 'image' and 'label'")


def _read_pickapic(reader: _Reader, position: int, row: Mapping[str, Any]) -> None:
    prompt = _text(row, "caption")
    label = _require(row, "label_0")
    if isinstance(label, bool) or not isinstance(label, (int, float)):
        raise _BadRow(f"wrong type: 'label_0' must be 0, 0.5 or 1, got {type(label).__name__}")
    if label not in (0, 0.5, 1):
        raise _BadRow(f"bad value: 'label_0' must be 0, 0.5 or 1, got {label!r}")
    first, second = reader.image(row, "jpg_0"), reader.image(row, "jpg_1")
    chosen, rejected = (second, first) if label == 0 else (first, second)
    reader.add_pair(prompt, chosen, rejected, label == 0.5, position)


def _rating(row: Mapping[str, Any], key: str) -> float:
    value = _require(row, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _BadRow(f"wrong type: {key!r} must be a number, got {value!r}")
    return float(value)


def _read_llava_reward(reader: _Reader, position: int, row: Mapping[str, Any]) -> None:
    """An official LLaVA-Reward row: a rated pair, or one image with a classification label."""
    if not row.keys() & {"chosen_path", "reject_path"}:
        if "path" not in row and "label" not in row:
            raise _BadRow("missing key: a pair needs 'chosen_path' and 'reject_path', a classification row "
                          "'path' and 'label'")
        prompt = _text(row, "prompt")
        label = _binary_label(row, "label")
        reader.data.labels.append(LabelExample(prompt, reader.image(row, "path"), label, position))
        return
    prompt = _require(row, "prompt")
    if isinstance(prompt, str):
        rejected_prompt = None
    elif isinstance(prompt, (list, tuple)) and len(prompt) == 2 and all(isinstance(p, str) for p in prompt):
        prompt, rejected_prompt = prompt  # the official code scores each image against its own prompt
    else:
        raise _BadRow("wrong type: 'prompt' must be a string or a list of two strings "
                      "[chosen prompt, rejected prompt]")
    # ratings are optional (a pair without them is an ordinary pair), but one without the other is a bad row
    rated = row.get("c_rate") is not None or row.get("r_rate") is not None
    ratings = (_rating(row, "c_rate"), _rating(row, "r_rate")) if rated else (None, None)
    chosen, rejected = reader.image(row, "chosen_path"), reader.image(row, "reject_path")
    reader.add_pair(prompt, chosen, rejected, rated and ratings[0] == ratings[1], position,
                    rejected_prompt=rejected_prompt, chosen_rating=ratings[0], rejected_rating=ratings[1])


def _read_ranked_row(
    reader: _Reader, position: int, row: Mapping[str, Any], image_keys: tuple[str, ...], rank_key: str
) -> None:
    """One prompt with a list of images and their ranks (lower is better, equal is a tie)."""
    prompt = _text(row, "prompt")
    key, values = _path_list(row, image_keys)
    ranks = _number_list(row, rank_key, len(values))
    reader.add_ranked(prompt, _images(reader, key, values), [-r for r in ranks], [position] * len(values))


def _read_hpdv2(reader: _Reader, position: int, row: Mapping[str, Any]) -> None:
    if "human_preference" not in row:
        _read_ranked_row(reader, position, row, ("file_path", "image_path"), "rank")
        return
    prompt = _text(row, "prompt")
    key, values = _path_list(row, ("file_path", "image_path"))
    preference = _number_list(row, "human_preference", len(values))
    images = _images(reader, key, values)
    winner = max(preference)
    if all(p == winner for p in preference):
        reader.add_ranked(prompt, images, preference, [position] * len(images))
        return
    # only winner-versus-rest is known: two non-preferred images are not a tie
    for best in (i for i, p in enumerate(preference) if p == winner):
        for other in (i for i, p in enumerate(preference) if p != winner):
            reader.add_pair(prompt, images[best], images[other], False, position)


def _read_imagereward(reader: _Reader, rows: Iterable[tuple[int, Any]]) -> None:
    """Rows of one prompt each (`generations`, `ranking`), or of one image each, grouped by `prompt_id`."""
    groups: dict[Any, tuple[str, list[ImageRef], list[float], list[int]]] = {}
    for position, row in reader.each_row(rows):
        try:
            if "generations" in row:
                _read_ranked_row(reader, position, row, ("generations",), "ranking")
                continue
            prompt = _text(row, "prompt")
            rank = _require(row, "rank")
            if isinstance(rank, bool) or not isinstance(rank, (int, float)):
                raise _BadRow(f"wrong type: 'rank' must be a number, got {type(rank).__name__}")
            image = reader.image(row, "image_path" if row.get("image_path") is not None else "image")
        except _BadRow as exc:
            reader.skip(position, str(exc))
            continue
        prompt_id = row.get("prompt_id")
        _, images, scores, positions = groups.setdefault(prompt if prompt_id is None else prompt_id,
                                                         (prompt, [], [], []))
        images.append(image)
        scores.append(-float(rank))
        positions.append(position)
    for prompt, images, scores, positions in groups.values():
        reader.add_ranked(prompt, images, scores, positions)


_LAYOUTS: dict[str, _LayoutReader] = {
    "pairs": _per_row(_read_pair),
    "labels": _per_row(_read_label),
    _OWN_LAYOUT: _per_row(_read_pair_or_label),
    "pickapic": _per_row(_read_pickapic),
    "hpdv2": _per_row(_read_hpdv2),
    "llava_reward": _per_row(_read_llava_reward),
    "imagereward": _read_imagereward,
}
