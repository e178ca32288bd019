"""The committed toy generator: it loads as a diffusers pipeline and draws what the prompt asks, often, not always."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from trainers.cli import main as rlhf_main
from rlhf.testing import build_tiny_sd, build_tiny_tokenizer
from rlhf.toy.generators import toy_generator_path
from rlhf.toy import EVAL_PROMPTS, TOY_COLOURS, TOY_SHAPES, oracle_colour, parse_prompt
from rlhf.toy.pretrain import evaluate_toy_generator

CHANCE_ALIGNMENT = 1 / (len(TOY_COLOURS) * len(TOY_SHAPES))  # a drawer that ignores the prompt
# Margin over chance on these seeds: the committed generator measures 0.50 here (chance 1/15 = 0.067).
ALIGNMENT_MARGIN = 0.25
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def pipeline() -> StableDiffusionPipeline:
    loaded = StableDiffusionPipeline.from_pretrained(toy_generator_path())
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def samples(pipeline) -> tuple[dict[str, float], torch.Tensor]:
    """EVAL_PROMPTS x seeds 0, 1 (prompt-major), 20 DDIM steps, eta 1.0, guidance 3.0: the documented protocol."""
    return evaluate_toy_generator(pipeline, EVAL_PROMPTS, seeds=SEEDS, num_inference_steps=20, guidance_scale=3.0,
                                  eta=1.0)


def _with_next_colour(prompt: str) -> str:
    colours = list(TOY_COLOURS)
    colour, _ = parse_prompt(prompt)
    return prompt.replace(colour, colours[(colours.index(colour) + 1) % len(colours)], 1)


def test_committed_generator_is_small_and_described():
    path = toy_generator_path()
    weights = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    assert 0 < weights < 10 * 2**20
    report = json.loads((path / "toy_generator.json").read_text())
    assert report["chance"]["alignment"] < report["oracle"]["alignment"] < 0.8
    assert report["command"].startswith("rlhf toy pretrain")


def test_committed_tokenizer_is_the_one_the_code_builds(pipeline):
    # token ids must not depend on the process that built them, or a re-run of `rlhf toy pretrain` would differ
    assert pipeline.tokenizer.get_vocab() == build_tiny_tokenizer().get_vocab()


def test_oracle_alignment_is_above_chance_by_the_margin(samples):
    numbers, images = samples
    assert images.shape == (len(EVAL_PROMPTS) * len(SEEDS), 3, 32, 32)
    assert numbers["alignment"] >= CHANCE_ALIGNMENT + ALIGNMENT_MARGIN, numbers
    assert numbers["alignment"] < 0.9, numbers  # not solved: RL has room (the full protocol measures < 0.8)


def test_images_vary_with_seed_and_prompt(samples):
    _, images = samples
    # averaged over prompts: one prompt (e.g. a pale shape on white) may draw near-identical images
    by_prompt = images.reshape(len(EVAL_PROMPTS), len(SEEDS), *images.shape[1:])
    assert (by_prompt[:, 0] - by_prompt[:, 1]).abs().mean() > 0.02  # same prompt, another seed
    assert (by_prompt[:-1, 0] - by_prompt[1:, 0]).abs().mean() > 0.02  # same seed, another prompt
    prompts = [prompt for prompt in EVAL_PROMPTS for _ in SEEDS]
    # the same images judged against prompts naming another colour: the colour follows the prompt
    shifted = [_with_next_colour(prompt) for prompt in prompts]
    matching, other = oracle_colour(images, prompts).mean(), oracle_colour(images, shifted).mean()
    assert matching >= other + 0.3, (matching, other)


def test_random_tiny_pipeline_round_trips(tmp_path):
    path = build_tiny_sd(tmp_path / "tiny", seed=0)
    loaded = StableDiffusionPipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    images = loaded("a red circle on a white background", num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images
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
