"""`rlhf score`: a JSONL with bad rows scores the good ones and names the bad ones by line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from reward import RewardModel
from trainers.cli import main


@pytest.fixture(scope="module")
def saved_model(tiny_vlm_paths, tmp_path_factory):
    directory = tmp_path_factory.mktemp("rm")
    RewardModel.from_backbone(tiny_vlm_paths["llava"], ["alignment", "safety"], lora_r=4).save_pretrained(directory)
    return directory


def test_score_jsonl_skips_bad_rows_and_scores_the_rest(saved_model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "corrupt.png").write_bytes(b"junk")
    lines = [
        json.dumps({"image": "0.png", "prompt": "a red circle"}),
        json.dumps({"image": "corrupt.png", "prompt": "x"}),
        "{not json",
        json.dumps({"image": "1.png", "prompt": "a blue square"}),
        json.dumps({"image": "missing.png", "prompt": "y"}),
        json.dumps({"image": "1.png"}),
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines))
    out = tmp_path / "scores.csv"
    assert main(["score", "--model", str(saved_model), "--data", str(tmp_path / "rows.jsonl"),
                 "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["prompt"] for r in rows] == ["a red circle", "a blue square"]
    assert all(np.isfinite(float(r[p])) for r in rows for p in ("alignment", "safety"))
    err = capsys.readouterr().err
    for line_number in (2, 3, 5, 6):
        assert f"rows.jsonl:{line_number}:" in err
    assert "scored 2 rows, skipped 4" in err

    model = RewardModel.from_pretrained(saved_model)
    direct = model.score([tmp_path / "0.png"], ["a red circle"])
    assert float(rows[0]["alignment"]) == pytest.approx(float(direct["alignment"][0]), abs=1e-6)


def test_score_images_dir_writes_jsonl(saved_model, tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(saved_model), "--images", str(tmp_path), "--prompt", "red",
                 "--output", str(out), "--perspectives", "safety"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(row) == {"image", "prompt", "safety"}


def test_score_user_errors_are_messages_not_tracebacks(saved_model, tmp_path, capsys):
    assert main(["score", "--model", str(saved_model), "--images", str(tmp_path)]) == 2
    assert "prompt: required" in capsys.readouterr().err
    assert main(["score", "--model", str(saved_model), "--data", "x.jsonl", "--bogus", "1"]) == 2
    assert "unknown argument(s) ['--bogus', '1']" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {saved_model}\nbatchsize: 3\n")
    assert main(["score", "--config", str(config)]) == 2
    assert "unknown config key(s) ['batchsize']" in capsys.readouterr().err
