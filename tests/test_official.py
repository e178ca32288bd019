"""Released LLaVA-Reward checkpoints: tiny official-format checkpoints made by the official code
(tools/official_parity) load with `from_official` and score as the official code scored them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from reward import RewardModel
from reward.official import general_preference, official_pixels, official_text, official_text_inputs
from trainers.cli import main as rlhf_main

ROOT = Path(__file__).parent / "fixtures" / "official"
RECORD = json.loads((ROOT / "scores.json").read_text())
CHECKPOINTS = RECORD["checkpoints"]
IMAGES = sorted(RECORD["images"])
PROMPTS = RECORD["prompts"]
TOLERANCE = 1e-4  # float32; the measured gap is ~1e-6


def recorded(checkpoint: str, prompt: str) -> torch.Tensor:
    values = CHECKPOINTS[checkpoint]["batch_of_one"]
    return torch.tensor([values[image][prompt] for image in IMAGES]).reshape(len(IMAGES), -1)


def image_paths() -> list[str]:
    return [str(ROOT / "images" / f"{name}.png") for name in IMAGES]


def load(checkpoint: str, name: str = "official") -> RewardModel:
    info = CHECKPOINTS[checkpoint]
    return RewardModel.from_official(ROOT / info["checkpoint_dir"], ROOT / info["base_dir"], perspective=name)


@pytest.fixture(scope="module")
def official_models() -> dict[str, RewardModel]:
    return {checkpoint: load(checkpoint) for checkpoint in CHECKPOINTS}


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_official_scores_match_the_official_code(official_models, checkpoint):
    model = official_models[checkpoint]
    for prompt in PROMPTS:
        # all five images in one batch: the official mode is the batch-of-one result, whatever the batch
        ours = model.head_outputs(image_paths(), [prompt] * len(IMAGES))["official"]
        torch.testing.assert_close(ours, recorded(checkpoint, prompt), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_official_prompt_text_and_token_ids_are_the_official_ones(official_models, checkpoint):
    model = official_models[checkpoint]
    backbone, reading = model.backbone, model._reading("official")
    image, prompt = IMAGES[0], PROMPTS[1]
    inputs = CHECKPOINTS[checkpoint]["inputs"][image][prompt]
    assert official_text(backbone, reading, prompt) == inputs["prompt_text"]
    pixels = official_pixels(backbone, reading, [Image.open(image_paths()[0]).convert("RGB")])
    _, features = backbone.encode_images(pixels)
    ids = official_text_inputs(backbone, reading, [prompt], [len(features[0])]).input_ids[0].tolist()
    expected = [value for value, count in inputs["input_ids_rle"] for _ in range(count)]
    # the official Phi processor marks image positions with -1; ours with the embedding row it reads there
    expected = [backbone.image_token_id if value < 0 else value for value in expected]
    assert ids == expected


def test_official_bradley_terry_and_general_preference_probabilities(official_models):
    model = official_models["phi3_v/gp_skipca"]
    paths, prompt = image_paths(), PROMPTS[0]
    probability = model.preference(paths[:2], paths[2:4], [prompt] * 2)["official"]
    a, b = recorded("phi3_v/gp_skipca", prompt)[:2], recorded("phi3_v/gp_skipca", prompt)[2:4]
    expected = torch.sigmoid((a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) / CHECKPOINTS["phi3_v/gp_skipca"]
                             ["general_preference_tau"])
    torch.testing.assert_close(probability, expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(general_preference(a, b, 0.1), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="General Preference head gives each image a vector"):
        model.score(paths[:1], [prompt])
    bradley_terry = official_models["qwen2_5_vl/bt_skipca"]
    probability = bradley_terry.preference(paths[:1], paths[1:2], [prompt])["official"]
    scores = recorded("qwen2_5_vl/bt_skipca", prompt)[:2, 0]
    torch.testing.assert_close(probability, torch.sigmoid((scores[:1] - scores[1:]) / 0.1), atol=TOLERANCE, rtol=0)


def test_several_official_perspectives_on_one_base_score_as_each_alone():
    model = load("phi3_v/bt_skipca", "alignment")
    model.load_official(ROOT / CHECKPOINTS["phi3_v/gp_skipca"]["checkpoint_dir"], "general")
    prompt = PROMPTS[1]
    mixed = model.head_outputs(image_paths(), [prompt] * len(IMAGES))
    torch.testing.assert_close(mixed["alignment"], recorded("phi3_v/bt_skipca", prompt), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(mixed["general"], recorded("phi3_v/gp_skipca", prompt), atol=TOLERANCE, rtol=0)


def test_convert_official_then_from_pretrained_and_rlhf_score(tmp_path, capsys):
    out = tmp_path / "converted"
    for checkpoint, name in (("qwen2_5_vl/bt_skipca", "alignment"), ("qwen2_5_vl/gp", "overall")):
        info = CHECKPOINTS[checkpoint]
        assert rlhf_main(["convert", "official", "--checkpoint", str(ROOT / info["checkpoint_dir"]),
                          "--base", str(ROOT / info["base_dir"]), "--perspective", name,
                          "--output_dir", str(out)]) == 0
    model = RewardModel.from_pretrained(out)
    assert model.perspectives == ["alignment", "overall"]
    prompt = PROMPTS[0]
    loaded = model.head_outputs(image_paths(), [prompt] * len(IMAGES))
    torch.testing.assert_close(loaded["alignment"], recorded("qwen2_5_vl/bt_skipca", prompt), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(loaded["overall"], recorded("qwen2_5_vl/gp", prompt), atol=TOLERANCE, rtol=0)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"image": path, "prompt": prompt}) + "\n" for path in image_paths()))
    capsys.readouterr()
    assert rlhf_main(["score", "--model", str(out), "--data", str(rows), "--perspectives", "alignment",
                      "--output", str(tmp_path / "scores.jsonl")]) == 0
    written = [json.loads(line)["alignment"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(written), recorded("qwen2_5_vl/bt_skipca", prompt)[:, 0],
                               atol=TOLERANCE, rtol=0)


def broken_copy(tmp_path: Path, checkpoint: str) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(ROOT / CHECKPOINTS[checkpoint]["checkpoint_dir"], target)
    return target


def test_bad_official_directories_are_named(tmp_path):
    qwen_base = ROOT / CHECKPOINTS["qwen2_5_vl/bt_skipca"]["base_dir"]
    no_lora = broken_copy(tmp_path / "a", "qwen2_5_vl/bt_skipca")
    shutil.rmtree(no_lora / "lora")
    with pytest.raises(ValueError, match=r"lora/adapter_config.json is missing"):
        RewardModel.from_official(no_lora, qwen_base)
    unknown_key = broken_copy(tmp_path / "b", "qwen2_5_vl/bt_skipca")
    config = yaml.safe_load((unknown_key / "reward_config.yaml").read_text())
    (unknown_key / "reward_config.yaml").write_text(yaml.safe_dump({**config, "value_head_dims": 2}))
    with pytest.raises(ValueError, match=r"reward_config.yaml: unknown key\(s\) \['value_head_dims'\]"):
        RewardModel.from_official(unknown_key, qwen_base)
    with pytest.raises(ValueError, match=r"config.json says the checkpoint was trained on a 'phi3_v' model, but "
                                         r"the base is 'qwen2_5_vl'"):
        RewardModel.from_official(ROOT / CHECKPOINTS["phi3_v/bt_skipca"]["checkpoint_dir"], qwen_base)
    no_weights = broken_copy(tmp_path / "c", "qwen2_5_vl/bt_skipca")
    (no_weights / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match=r"pytorch_model.bin is missing"):
        RewardModel.from_official(no_weights, qwen_base)


def test_convert_official_refuses_a_bad_directory_from_the_command_line(tmp_path, capsys):
    info = CHECKPOINTS["llava_next/bt"]
    broken = broken_copy(tmp_path, "llava_next/bt")
    shutil.rmtree(broken / "lora")
    code = rlhf_main(["convert", "official", "--checkpoint", str(broken), "--base", str(ROOT / info["base_dir"]),
                      "--output_dir", str(tmp_path / "out")])
    assert code == 2
    assert "lora/adapter_config.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
