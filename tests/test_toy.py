"""The toy world: deterministic data, oracles that read the truth back from pixels, and `rlhf toy data`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rlhf import toy
from trainers.cli import main as rlhf_main


def _scene(colour: str = "red", shape: str = "circle", background: str = "white", **changes) -> toy.ToyScene:
    return toy.ToyScene(colour, shape, background, centre_x=16.0, centre_y=16.0, size=14.0, **changes)


def _all_scenes() -> list[toy.ToyScene]:
    return [_scene(c, s, b) for c in toy.TOY_COLOURS for s in toy.TOY_SHAPES for b in toy.TOY_BACKGROUNDS]


def test_prompts_are_deterministic_and_parse():
    assert toy.toy_prompts(20, seed=3) == toy.toy_prompts(20, seed=3)
    assert toy.toy_prompts(20, seed=3) != toy.toy_prompts(20, seed=4)
    assert len(toy.EVAL_PROMPTS) == len(toy.TOY_COLOURS) * len(toy.TOY_SHAPES)
    assert toy.parse_prompt("a purple triangle on a black background") == ("purple", "triangle")
    with pytest.raises(ValueError, match="toy colour"):
        toy.parse_prompt("a photo of a cat")


def test_images_are_deterministic_small_and_in_range():
    images, captions = toy.sample_toy_images(8, seed=1)
    again, captions_again = toy.sample_toy_images(8, seed=1)
    assert images.shape == (8, 3, 32, 32) and captions == captions_again
    assert torch.equal(images, again)
    assert images.min() >= 0 and images.max() <= 1
    assert not torch.equal(images, toy.sample_toy_images(8, seed=2)[0])


def test_oracles_recognise_every_colour_shape_background():
    scenes = _all_scenes()
    images = toy.draw_scenes(scenes)
    prompts = [s.prompt for s in scenes]
    assert toy.oracle_alignment(images, prompts).tolist() == [1.0] * len(scenes)
    assert toy.oracle_colour(images, prompts).tolist() == [1.0] * len(scenes)
    assert toy.oracle_shape(images, prompts).tolist() == [1.0] * len(scenes)
    assert toy.oracle_safety(images).tolist() == [1.0] * len(scenes)


def test_oracles_reject_wrong_colour_or_shape():
    images = toy.draw_scenes([_scene("red", "circle")] * 3)
    prompts = ["a blue circle on a white background", "a red square on a white background",
               "a green triangle on a white background"]
    assert toy.oracle_alignment(images, prompts).tolist() == [0.0, 0.0, 0.0]
    assert toy.oracle_colour(images, prompts).tolist() == [0.0, 1.0, 0.0]
    assert toy.oracle_shape(images, prompts).tolist() == [1.0, 0.0, 0.0]
    blank = torch.full((1, 3, 32, 32), 0.95)
    assert toy.oracle_alignment(blank, prompts[:1]).item() == 0.0


def test_oracle_shape_survives_random_placement_and_size():
    rng = np.random.default_rng(0)
    scenes = [toy.random_scene(rng) for _ in range(200)]
    images = toy.draw_scenes(scenes)
    assert toy.oracle_alignment(images, [s.prompt for s in scenes]).mean().item() == 1.0


def test_safety_oracle_sees_the_mark():
    images = toy.draw_scenes([_scene(mark=(6.0, 6.0)), _scene(shape="square", background="gray", mark=(26.0, 25.0)),
                              _scene()])
    assert toy.oracle_safety(images).tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("kind", toy.CORRUPTIONS)
def test_corrupted_images_score_lower_fidelity(kind):
    rng = np.random.default_rng(0)
    clean = toy.draw_scenes([toy.random_scene(rng) for _ in range(32)])
    corrupted = torch.stack([toy.corrupt(image, kind, rng) for image in clean])
    clean_scores, corrupted_scores = toy.oracle_fidelity(clean), toy.oracle_fidelity(corrupted)
    assert clean_scores.min() > 0.9
    assert (corrupted_scores < clean_scores).all()
    assert 0 <= corrupted_scores.min() and clean_scores.max() <= 1


def test_colour_score_is_differentiable_and_prefers_the_named_colour():
    images = toy.draw_scenes([_scene("red"), _scene("blue")]).requires_grad_(True)
    prompts = ["a red circle on a white background"] * 2
    scores = toy.colour_score(images, prompts)
    assert scores[0] > scores[1] and ((0 <= scores) & (scores < 1)).all()
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad[1].abs().sum() > 0
    grey = torch.full((1, 3, 32, 32), 0.5, requires_grad=True)
    toy.colour_score(grey, prompts[:1]).sum().backward()
    assert torch.isfinite(grey.grad).all() and grey.grad.abs().sum() > 0


def test_alignment_score_is_dense_and_ranks_like_the_alignment_oracle():
    images = toy.draw_scenes([_scene("red", "circle"), _scene("red", "square"), _scene("blue", "circle")])
    prompts = ["a red circle on a white background"] * 3
    scores = toy.alignment_score(images, prompts)
    assert toy.oracle_alignment(images, prompts).tolist() == [1.0, 0.0, 0.0]
    assert scores[0] > 0.6 and scores[0] > scores[1] > 0 and scores[2] == 0
    assert ((0 <= scores) & (scores < 1)).all()
    # a blurred right answer is still right for the 0/1 oracle but scores lower: the signal a trainer can climb
    blurred = toy.corrupt(images[0], "blur", np.random.default_rng(0)).unsqueeze(0)
    assert toy.oracle_alignment(blurred, prompts[:1]).item() == 1.0
    assert toy.alignment_score(blurred, prompts[:1]) < scores[0]


def test_oracles_name_bad_inputs():
    with pytest.raises(ValueError, match="BCHW"):
        toy.oracle_fidelity(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        toy.oracle_alignment(torch.rand(2, 3, 32, 32), ["a red circle"])


def test_datasets_are_deterministic_and_paths_resolve(tmp_path):
    first = toy.write_toy_datasets(tmp_path / "a", n=12, n_test=6, seed=5)
    second = toy.write_toy_datasets(tmp_path / "b", n=12, n_test=6, seed=5)
    for perspective in ("alignment", "fidelity", "safety"):
        for split, count in (("train", 12), ("test", 6)):
            path = first[perspective][split]
            assert path == tmp_path / "a" / perspective / f"{split}.jsonl"
            assert path.read_text() == second[perspective][split].read_text()
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(rows) == count
            for row in rows:
                for key in ("chosen", "rejected", "image"):
                    if key in row:
                        image = Image.open(path.parent / row[key])
                        assert image.size == (32, 32) and image.mode == "RGB"
    twin = tmp_path / "b" / "alignment" / "images" / "train_00003_chosen.png"
    original = tmp_path / "a" / "alignment" / "images" / "train_00003_chosen.png"
    assert twin.read_bytes() == original.read_bytes()


def _load(path, name):
    return torch.from_numpy(np.asarray(Image.open(path.parent / name), dtype=np.float32) / 255).permute(2, 0, 1)


def test_dataset_truth_matches_the_oracles(tmp_path):
    written = toy.write_toy_datasets(tmp_path, n=24, n_test=4, seed=0)
    alignment = written["alignment"]["train"]
    rows = [json.loads(line) for line in alignment.read_text().splitlines()]
    chosen = torch.stack([_load(alignment, r["chosen"]) for r in rows])
    rejected = torch.stack([_load(alignment, r["rejected"]) for r in rows])
    prompts = [r["prompt"] for r in rows]
    assert toy.oracle_alignment(chosen, prompts).tolist() == [1.0] * len(rows)
    assert toy.oracle_alignment(rejected, prompts).tolist() == [0.0] * len(rows)

    fidelity = written["fidelity"]["train"]
    rows = [json.loads(line) for line in fidelity.read_text().splitlines()]
    chosen = toy.oracle_fidelity(torch.stack([_load(fidelity, r["chosen"]) for r in rows]))
    rejected = toy.oracle_fidelity(torch.stack([_load(fidelity, r["rejected"]) for r in rows]))
    assert (chosen > rejected).all()

    safety = written["safety"]["train"]
    rows = [json.loads(line) for line in safety.read_text().splitlines()]
    labels = [float(r["label"]) for r in rows]
    assert 0 < sum(labels) < len(labels)
    assert toy.oracle_safety(torch.stack([_load(safety, r["image"]) for r in rows])).tolist() == labels


def test_cli_writes_the_files(tmp_path, capsys):
    assert rlhf_main(["toy", "data", "--out", str(tmp_path), "--n", "4", "--n_test", "2", "--seed", "1"]) == 0
    for perspective in ("alignment", "fidelity", "safety"):
        assert len((tmp_path / perspective / "train.jsonl").read_text().splitlines()) == 4
        assert len((tmp_path / perspective / "test.jsonl").read_text().splitlines()) == 2
    assert rlhf_main(["toy", "data", "--out", str(tmp_path), "--n_rows", "4"]) == 2
    assert "n_rows" in capsys.readouterr().err
    assert rlhf_main(["toy", "data"]) == 2
    assert "--out is required" in capsys.readouterr().err
