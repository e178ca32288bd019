"""Preference data readers: our JSONL/JSON layouts, `datasets` objects, ImageRewardDB, Pick-a-Pic v2 and
HPDv2 files built here; bad rows skipped and reported with their position; a file with no usable row fails."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reward.data import BadRowWarning, ImageRef, load_preferences

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def png_bytes(colour: tuple[int, int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, colour: tuple[int, int, int], mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(colour, mode))
    return path


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def colour_of(ref: ImageRef) -> tuple[int, int, int]:
    return ref.load().getpixel((0, 0))


def test_relative_paths_resolve_against_the_file_and_images_come_back_rgb(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    write_png(data_dir / "img" / "red.png", RED, mode="RGBA")
    write_png(data_dir / "img" / "blue.png", BLUE, mode="P")
    write_png(data_dir / "img" / "grey.png", GREY, mode="L")
    source = write_jsonl(data_dir / "prefs.jsonl", [
        {"prompt": "a red square", "chosen": "img/red.png", "rejected": "img/blue.png"},
        {"prompt": "a grey square", "image": "img/grey.png", "label": 1},
        {"prompt": "a blue square", "image": "img/blue.png", "label": False},
    ])
    monkeypatch.chdir(tmp_path)  # paths must not depend on the working directory

    data = load_preferences(source)

    assert data.kind == "pairs+labels"
    assert data.summary() == {"source": str(source), "kind": "pairs+labels", "rows_read": 3, "pairs": 1,
                              "tie_pairs": 0, "dropped_ties": 0, "labels": 2, "skipped": 0}
    pair = data.pairs[0]
    assert (pair.prompt, pair.position, pair.tie) == ("a red square", 1, False)
    assert pair.chosen.path == data_dir / "img" / "red.png"
    assert (pair.chosen.load().mode, colour_of(pair.chosen), colour_of(pair.rejected)) == ("RGB", RED, BLUE)
    assert [(ex.label, ex.position, ex.image.load().mode) for ex in data.labels] == [(1, 2, "RGB"), (0, 3, "RGB")]
    assert colour_of(data.labels[0].image) == GREY


def test_each_bad_row_kind_is_skipped_and_counted_with_its_line(tmp_path):
    write_png(tmp_path / "good.png", RED)
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    noise = Image.frombytes("RGB", (32, 32), bytes(range(256)) * 12)
    noise.save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])  # opens fine, pixel data cut off
    source = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "ok", "chosen": "good.png", "rejected": "good.png"},          # 1
        {"prompt": "gone", "chosen": "good.png", "rejected": "missing.png"},     # 2 missing file
        {"prompt": "junk", "chosen": "garbage.png", "rejected": "good.png"},     # 3 corrupt image
        {"prompt": "cut", "chosen": "good.png", "rejected": "truncated.png"},    # 4 corrupt image (truncated)
        {"prompt": 7, "chosen": "good.png", "rejected": "good.png"},             # 5 wrong type
        {"prompt": "no rejected", "chosen": "good.png"},                         # 6 missing key
        "{not json",                                                            # 7 invalid JSON
        "",                                                                      # 8 blank: ignored
        {"prompt": "label", "image": "good.png", "label": 1},                    # 9
        {"prompt": "label", "image": "good.png", "label": "safe"},               # 10 wrong type
        {"prompt": "label", "image": 3, "label": 1},                             # 11 wrong type
        [1, 2],                                                                  # 12 wrong type
    ])

    with pytest.warns(BadRowWarning, match=r"skipped 9 of 11 rows") as caught:
        data = load_preferences(source)

    assert len(caught) == 1
    assert (len(data.pairs), len(data.labels), data.position_unit) == (1, 1, "line")
    reasons = {position: reason for position, reason in data.skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 10, 11, 12]
    assert reasons[2].startswith("missing file") and "missing.png" in reasons[2]
    assert reasons[3].startswith("corrupt image") and "garbage.png" in reasons[3]
    assert reasons[4].startswith("corrupt image") and "truncated.png" in reasons[4]
    assert reasons[5] == "wrong type: 'prompt' must be a string, got int"
    assert reasons[6] == "missing key 'rejected'"
    assert reasons[7].startswith("invalid JSON")
    assert all(reasons[line].startswith("wrong type") for line in (10, 11, 12))
    assert "line 2: missing file" in str(caught[0].message)


def test_check_images_false_skips_decoding_but_not_the_existence_check(tmp_path):
    write_png(tmp_path / "good.png", RED)
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    source = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "p", "chosen": "garbage.png", "rejected": "good.png"},
        {"prompt": "p", "chosen": "missing.png", "rejected": "good.png"},
    ])
    with pytest.warns(BadRowWarning):
        data = load_preferences(source, check_images=False)
    assert len(data.pairs) == 1 and [row.position for row in data.skipped] == [2]


def test_a_file_with_no_usable_row_is_an_error_naming_it(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "missing.png", "rejected": "x.png"}])
    with pytest.raises(ValueError, match=r"no usable row in .*bad\.jsonl.*line 1: missing file"):
        load_preferences(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"no usable row in .*empty\.jsonl"):
        load_preferences(empty)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_preferences(tmp_path / "nowhere.jsonl")


def test_forced_kind_and_invalid_options(tmp_path):
    write_png(tmp_path / "good.png", RED)
    source = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "p", "chosen": "good.png", "rejected": "good.png"},
        {"prompt": "p", "image": "good.png", "label": 0},
    ])
    with pytest.warns(BadRowWarning):
        data = load_preferences(source, kind="labels")
    assert (data.kind, len(data.labels), data.skipped[0]) == ("labels", 1, (1, "missing key 'label'"))
    with pytest.raises(ValueError, match="kind must be one of"):
        load_preferences(source, kind="csv")
    with pytest.raises(ValueError, match="ties must be one of"):
        load_preferences(source, ties="half")


def test_datasets_objects_with_paths_pil_and_bytes(tmp_path):
    datasets = pytest.importorskip("datasets")
    write_png(tmp_path / "red.png", RED)
    pairs = datasets.Dataset.from_dict({
        "prompt": ["by path", "by bytes"],
        "chosen": ["red.png", "red.png"],
        "rejected": [str(tmp_path / "missing.png"), "red.png"],
    })
    with pytest.warns(BadRowWarning):
        data = load_preferences(pairs, image_root=tmp_path)
    assert (data.kind, data.position_unit, len(data.pairs)) == ("pairs", "row", 1)
    assert data.skipped[0].position == 0 and data.skipped[0].reason.startswith("missing file")

    labels = datasets.Dataset.from_dict(
        {"prompt": ["safe", "unsafe"], "image": [Image.new("RGB", (4, 4), GREEN), png_bytes(BLUE)], "label": [1, 0]},
        features=datasets.Features({"prompt": datasets.Value("string"), "image": datasets.Image(),
                                    "label": datasets.Value("int64")}),
    )
    data = load_preferences(labels)
    assert data.kind == "labels"
    assert [(colour_of(ex.image), ex.label) for ex in data.labels] == [(GREEN, 1), (BLUE, 0)]
    undecoded = labels.cast_column("image", datasets.Image(decode=False))  # rows hold {"bytes", "path"}
    assert [colour_of(ex.image) for ex in load_preferences(undecoded).labels] == [GREEN, BLUE]


def test_pickapic_parquet_with_ties_kept_or_dropped(tmp_path):
    source = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({
        "caption": ["zero wins", "one wins", "tie", "bad label", "corrupt", None],
        "jpg_0": [png_bytes(RED), png_bytes(RED), png_bytes(RED), png_bytes(RED), b"\x89PNG broken", png_bytes(RED)],
        "jpg_1": [png_bytes(BLUE)] * 6,
        "label_0": [1.0, 0.0, 0.5, 0.7, 1.0, 1.0],
        "label_1": [0.0, 1.0, 0.5, 0.3, 0.0, 0.0],
        "user_id": [1, 2, 3, 4, 5, 6],
    }), source)

    with pytest.warns(BadRowWarning, match="skipped 3 of 6"):
        kept = load_preferences(source)
    assert kept.kind == "pickapic"
    assert [(p.prompt, colour_of(p.chosen), colour_of(p.rejected), p.tie, p.position) for p in kept.pairs] == [
        ("zero wins", RED, BLUE, False, 0), ("one wins", BLUE, RED, False, 1), ("tie", RED, BLUE, True, 2)]
    reasons = dict(kept.skipped)
    assert reasons[3].startswith("bad value: 'label_0'")
    assert reasons[4].startswith("corrupt image: jpg_0")
    assert reasons[5] == "missing key 'caption'"

    with pytest.warns(BadRowWarning):
        dropped = load_preferences(source, ties="drop")
    assert [p.prompt for p in dropped.pairs] == ["zero wins", "one wins"]
    assert (dropped.dropped_ties, dropped.summary()["tie_pairs"], kept.summary()["tie_pairs"]) == (1, 0, 1)


def test_hpdv2_train_and_test_layouts(tmp_path):
    for name, colour in [("a", RED), ("b", GREEN), ("c", BLUE)]:
        write_png(tmp_path / "images" / f"{name}.jpg", colour)
    train = tmp_path / "train.json"
    train.write_text(json.dumps([
        {"prompt": "second preferred", "file_path": ["a.jpg", "b.jpg"], "human_preference": [0, 1], "user_hash": "u"},
        {"prompt": "first preferred", "file_path": ["c.jpg", "a.jpg"], "human_preference": [1, 0]},
        {"prompt": "mismatch", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0, 0]},
        {"prompt": "winner missing", "file_path": ["gone.jpg", "b.jpg"], "human_preference": [1, 0]},
    ]))
    with pytest.warns(BadRowWarning, match="skipped 2 of 4"):
        data = load_preferences(train, image_root=tmp_path / "images")
    assert data.kind == "hpdv2"
    assert [(p.prompt, colour_of(p.chosen), colour_of(p.rejected)) for p in data.pairs] == [
        ("second preferred", GREEN, RED), ("first preferred", BLUE, RED)]
    assert dict(data.skipped)[2] == "bad value: 'human_preference' has 3 entries for 2 images"
    assert dict(data.skipped)[3].startswith("missing file: file_path[0]")

    test = tmp_path / "test.json"  # ranked: lower rank is better, equal ranks are ties
    test.write_text(json.dumps([{"prompt": "ranked", "image_path": ["a.jpg", "b.jpg", "c.jpg"], "rank": [1, 3, 1]}]))
    data = load_preferences(test, image_root=tmp_path / "images")
    assert [(colour_of(p.chosen), colour_of(p.rejected), p.tie) for p in data.pairs] == [
        (RED, GREEN, False), (RED, BLUE, True), (BLUE, GREEN, False)]


def test_imagerewarddb_per_image_rows_grouped_by_prompt(tmp_path):
    for name, colour in [("a", RED), ("b", GREEN), ("c", BLUE)]:
        write_png(tmp_path / "images" / "train" / f"{name}.webp", colour)
    rows = [
        {"image_path": "images/train/a.webp", "prompt_id": "001", "prompt": "first", "rank": 2},
        {"image_path": "images/train/b.webp", "prompt_id": "001", "prompt": "first", "rank": 1},
        {"image_path": "images/train/gone.webp", "prompt_id": "001", "prompt": "first", "rank": 3},
        {"image_path": "images/train/c.webp", "prompt_id": "001", "prompt": "first", "rank": 3},
        {"image_path": "images/train/a.webp", "prompt_id": "002", "prompt": "second", "rank": 1},
        {"image_path": "images/train/b.webp", "prompt_id": "002", "prompt": "second", "rank": 1},
        {"image_path": "images/train/c.webp", "prompt_id": "003", "prompt": "alone", "rank": 1},
    ]
    source = tmp_path / "metadata-train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)

    with pytest.warns(BadRowWarning, match="skipped 1 of 7"):
        data = load_preferences(source)
    assert data.kind == "imagereward"
    assert data.skipped[0].position == 2 and data.skipped[0].reason.startswith("missing file")
    assert [(p.prompt, colour_of(p.chosen), colour_of(p.rejected), p.tie, p.position) for p in data.pairs] == [
        ("first", GREEN, RED, False, 1), ("first", RED, BLUE, False, 0), ("first", GREEN, BLUE, False, 1),
        ("second", RED, GREEN, True, 4)]

    grouped = write_jsonl(tmp_path / "grouped.jsonl", [
        {"prompt": "grouped", "generations": ["images/train/c.webp", "images/train/a.webp"], "ranking": [2, 1]}])
    data = load_preferences(grouped)
    assert [(colour_of(p.chosen), colour_of(p.rejected)) for p in data.pairs] == [(RED, BLUE)]
