"""The committed toy generator: it loads as a diffusers pipeline and draws what the prompt asks, often but not always."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from rlhf.cli import main as rlhf_main
from rlhf.testing import build_tiny_sd, toy_generator_path
from rlhf.toy import EVAL_PROMPTS, TOY_COLOURS, TOY_SHAPES, oracle_colour
from rlhf.toy_pretrain import evaluate_toy_generator

CHANCE_ALIGNMENT = 1 / (len(TOY_COLOURS) * len(TOY_SHAPES))  # a drawer that ignores the prompt
# Margin over chance stated by the "well above chance": at least 0.25 above 1/15 on these seeds.
ALIGNMENT_MARGIN = 0.25


@pytest.fixture(scope="module")
def pipeline() -> StableDiffusionPipeline:
    loaded = StableDiffusionPipeline.from_pretrained(toy_generator_path())
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _sample(pipeline: StableDiffusionPipeline, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline(prompts, num_inference_steps=20, guidance_scale=3.0, eta=1.0, generator=generators,
                    output_type="pt").images


def test_committed_generator_is_small_and_described():
    path = toy_generator_path()
    weights = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    assert 0 < weights < 10 * 2**20
    report = json.loads((path / "toy_generator.json").read_text())
    assert report["chance"]["alignment"] < report["oracle"]["alignment"] < 0.8
    assert report["command"].startswith("rlhf toy pretrain")


def test_oracle_alignment_is_above_chance_by_the_margin(pipeline):
    numbers, images = evaluate_toy_generator(pipeline, EVAL_PROMPTS, seeds=[0, 1], num_inference_steps=20,
                                             guidance_scale=3.0, eta=1.0)
    assert images.shape == (len(EVAL_PROMPTS) * 2, 3, 32, 32)
    assert numbers["alignment"] >= CHANCE_ALIGNMENT + ALIGNMENT_MARGIN, numbers
    assert numbers["alignment"] < 0.9, numbers  # leaves RL room (the full protocol's number is < 0.8)


def test_images_vary_with_seed_and_prompt(pipeline):
    prompts = ["a red circle on a white background"] * 2 + ["a blue square on a white background"]
    images = _sample(pipeline, prompts, seeds=[0, 1, 0])
    assert (images[0] - images[1]).abs().mean() > 0.02  # another seed, another image
    assert (images[0] - images[2]).abs().mean() > 0.02  # another prompt, another image
    red = ["a red circle on a white background"] * 4
    blue = ["a blue circle on a white background"] * 4
    red_images = _sample(pipeline, red, seeds=[0, 1, 2, 3])
    blue_images = _sample(pipeline, blue, seeds=[0, 1, 2, 3])
    # the colour follows the prompt: each image shows its own colour more often than the other prompt's
    assert oracle_colour(red_images, red).sum() > oracle_colour(red_images, blue).sum()
    assert oracle_colour(blue_images, blue).sum() > oracle_colour(blue_images, red).sum()


def test_random_tiny_pipeline_round_trips(tmp_path):
    path = build_tiny_sd(tmp_path / "tiny", seed=0)
    loaded = StableDiffusionPipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    images = _sample(loaded, ["a red circle on a white background"], seeds=[0])
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.tokenizer("a red circle").input_ids)[1:4] == [
        "a</w>", "red</w>", "circle</w>"]


def test_pretrain_cli_writes_a_loadable_pipeline(tmp_path, capsys):
    output_dir = tmp_path / "generator"
    argv = ["toy", "pretrain", "--output_dir", str(output_dir), "--vae_steps", "2", "--steps", "2",
            "--n_images", "16", "--batch_size", "4", "--vae_batch_size", "4", "--eval_seeds", "1",
            "--eval_inference_steps", "2", "--report_guidance_scales", "1.0"]
    assert rlhf_main(argv) == 0
    report = json.loads((output_dir / "toy_generator.json").read_text())
    assert set(report["oracle"]) == {"alignment", "colour", "shape", "fidelity"}
    assert (output_dir / "samples.png").is_file()
    StableDiffusionPipeline.from_pretrained(output_dir)
    assert rlhf_main(["toy", "pretrain", "--output_dir", str(output_dir), "--stpes", "3"]) == 2
    assert "stpes" in capsys.readouterr().err
