"""Reward functions: LocalReward over a scorer (a fake and the tiny RewardModel), built-ins, build_reward, async."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch
from torch import nn

from reward import RewardModel
from rlhf.rewards.reward_fn import (
    BUILTINS,
    AsyncReward,
    LocalReward,
    RewardFunction,
    as_float_images,
    build_reward,
)
from rlhf.toy import oracle_alignment, oracle_fidelity, oracle_safety, sample_toy_images
from rlhf.rewards.weighting import Weighting
from tests.conftest import perturb_adapters

WEIGHTING = {
    "perspectives": {
        "alignment": {"weight": 2.0, "normalize": "batch", "clip": 1.5},
        "fidelity": {"constraint": "penalty", "threshold": 0.0, "penalty": 0.5},
    }
}


class FakeScorer(nn.Module):
    """Per-image scores from pixels and prompt length: enough to check the wrapper relies on the duck type only."""

    perspectives = ["bright", "red"]

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.calls: list[int] = []

    def score(self, images, prompts, perspectives=None):
        self.calls.append(images.shape[0])
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.float32)
        scores = {
            "bright": self.scale * images.mean(dim=(1, 2, 3)),
            "red": images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3)) + 0.01 * lengths,
        }
        return {name: scores[name] for name in (perspectives or self.perspectives)}


@pytest.fixture(scope="module")
def toy_batch():
    images, prompts = sample_toy_images(6, seed=3)
    return images, prompts


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_vlm_paths):
    model = RewardModel.from_backbone(tiny_vlm_paths["llava"], perspectives=["alignment", "fidelity"])
    perturb_adapters(model)
    return model


def test_local_reward_without_weighting_sums_the_raw_scores(toy_batch):
    images, prompts = toy_batch
    scorer = FakeScorer()
    reward_fn = LocalReward(scorer)
    assert isinstance(reward_fn, RewardFunction)
    rewards, info = reward_fn(images, prompts, None)
    expected = scorer.score(images, prompts)
    assert rewards.dtype == torch.float32 and rewards.shape == (6,)
    assert not rewards.requires_grad
    torch.testing.assert_close(rewards, (expected["bright"] + expected["red"]).detach())
    torch.testing.assert_close(info["raw"]["red"], expected["red"])
    assert set(info["normalized"]) == {"bright", "red"} and info["level"] == "reward"


def test_uint8_numpy_and_chunking_give_the_same_rewards(toy_batch):
    images, prompts = toy_batch
    quantised = (images * 255).round() / 255
    nhwc = (quantised * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    reward_fn = LocalReward(FakeScorer(), batch_size=4)
    reference, _ = LocalReward(FakeScorer(), batch_size=16)(quantised, prompts)
    for form in (quantised, nhwc, nhwc.numpy(), quantised.numpy()):
        torch.testing.assert_close(reward_fn(form, prompts)[0], reference)
    assert reward_fn.model.calls[-2:] == [4, 2]


def test_local_reward_equals_reward_model_score_folded_by_weighting(toy_batch, tiny_reward_model):
    images, prompts = toy_batch
    reward_fn = LocalReward(tiny_reward_model, weighting=WEIGHTING, batch_size=4)
    rewards, info = reward_fn(images, prompts, {})
    with torch.no_grad():
        scores = tiny_reward_model.score(images, prompts)
    expected = Weighting.from_config(WEIGHTING, tiny_reward_model.perspectives)(scores, prompts)
    torch.testing.assert_close(rewards, expected.total, atol=1e-5, rtol=1e-5)
    for name in ("alignment", "fidelity"):
        torch.testing.assert_close(info["raw"][name], scores[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(info["normalized"]["alignment"], expected.normalized["alignment"], atol=1e-5, rtol=1e-5)
    assert info["violated"]["fidelity"].tolist() == (scores["fidelity"] < 0).tolist()


def test_local_reward_without_weighting_equals_sum_of_reward_model_scores(toy_batch, tiny_reward_model):
    images, prompts = toy_batch
    rewards, _ = LocalReward(tiny_reward_model)(images, prompts)
    with torch.no_grad():
        scores = tiny_reward_model.score(images, prompts)
    torch.testing.assert_close(rewards, scores["alignment"] + scores["fidelity"], atol=1e-5, rtol=1e-5)


def test_differentiable_local_reward_gives_finite_nonzero_pixel_gradients(toy_batch, tiny_reward_model):
    images, prompts = toy_batch
    pixels = images.clone().requires_grad_(True)
    reward_fn = LocalReward(tiny_reward_model, weighting={"perspectives": {"alignment": 1.0, "fidelity": 0.5}},
                            differentiable=True)
    rewards, _ = reward_fn(pixels, prompts)
    assert rewards.requires_grad
    rewards.sum().backward()
    assert torch.isfinite(pixels.grad).all()
    assert pixels.grad.abs().sum() > 0


def test_differentiable_needs_a_differentiable_scorer_and_weighting():
    with pytest.raises(ValueError, match="differentiable: BuiltinScorer has no gradient"):
        build_reward({"builtin": "toy_oracles", "differentiable": True})
    with pytest.raises(ValueError, match="per_prompt. statistics are not differentiable"):
        LocalReward(FakeScorer(), weighting={"perspectives": {"bright": {"normalize": "per_prompt"}}},
                    differentiable=True)


def test_bad_inputs_are_clear_errors(toy_batch):
    images, prompts = toy_batch
    reward_fn = LocalReward(FakeScorer())
    with pytest.raises(ValueError, match="got 5 prompts for 6 images"):
        reward_fn(images, prompts[:5])
    with pytest.raises(ValueError, match=r"float pixels must lie in \[0, 1\]"):
        reward_fn(images * 2, prompts)
    with pytest.raises(ValueError, match="uint8 batch must be NHWC"):
        as_float_images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"unknown perspective\(s\) \['safety'\]"):
        LocalReward(FakeScorer(), weighting=Weighting.uniform(["safety"]))


def test_builtin_toy_oracles_match_the_oracles(toy_batch):
    images, prompts = toy_batch
    reward_fn = build_reward({"builtin": "toy_oracles", "weighting": {"perspectives": {"alignment": 1.0, "fidelity": 1.0}}})
    assert reward_fn.perspectives == ["alignment", "fidelity", "safety"] and not reward_fn.differentiable
    rewards, info = reward_fn(images, prompts)
    torch.testing.assert_close(info["raw"]["alignment"], oracle_alignment(images, prompts))
    torch.testing.assert_close(rewards, oracle_alignment(images, prompts) + oracle_fidelity(images))
    safety_fn = build_reward({"builtin": "toy_safety"})
    torch.testing.assert_close(safety_fn(images, prompts)[0], oracle_safety(images))


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_scores_a_toy_batch(name, toy_batch):
    images, prompts = toy_batch
    rewards, info = build_reward({"builtin": name})(images, prompts)
    assert rewards.shape == (6,) and torch.isfinite(rewards).all()
    assert list(info["raw"]) == list(BUILTINS[name][0])


def test_jpeg_compressibility_prefers_flat_images():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reward_fn = build_reward({"builtin": "jpeg_compressibility"})
    flat_reward, noise_reward = reward_fn(torch.cat([flat, noise]), ["a", "b"])[0]
    assert flat_reward > noise_reward and noise_reward < 0


@pytest.mark.parametrize("name", ["toy_colour_soft", "brightness"])
def test_differentiable_builtins_give_pixel_gradients(name, toy_batch):
    images, prompts = toy_batch
    reward_fn = build_reward({"builtin": name})
    assert reward_fn.differentiable
    pixels = images.clone().requires_grad_(True)
    reward_fn(pixels, prompts)[0].sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_build_reward_from_a_saved_model_directory(toy_batch, tiny_reward_model, tmp_path):
    images, prompts = toy_batch
    tiny_reward_model.save_pretrained(tmp_path / "rm")
    reward_fn = build_reward({"model": str(tmp_path / "rm"), "weighting": WEIGHTING, "batch_size": 3})
    expected, _ = LocalReward(tiny_reward_model, weighting=WEIGHTING)(images, prompts)
    torch.testing.assert_close(reward_fn(images, prompts)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ({"builtin": "toy_colour", "url": "http://x"}, ValueError, "exactly one of 'builtin', 'model' or 'url'"),
        ({}, ValueError, "exactly one of"),
        ("toy_colour", TypeError, "reward: expected a mapping"),
        ({"builtin": "toy_color"}, ValueError, "unknown built-in reward 'toy_color'"),
        ({"builtin": "toy_colour", "token": "x"}, ValueError, r"unknown key\(s\) \['token'\] for a 'builtin' reward"),
        ({"builtin": "toy_colour", "differentiable": "yes"}, TypeError, "reward.differentiable: expected true or false"),
        ({"builtin": "toy_oracles", "weighting": {"perspectives": {"beauty": 1}}}, ValueError, "unknown perspective 'beauty'"),
        ({"builtin": "toy_colour", "batch_size": 0}, ValueError, "batch_size: expected an integer >= 1"),
        ({"model": "/no/such/dir"}, FileNotFoundError, "no reward model directory /no/such/dir"),
        ({"url": "http://127.0.0.1:9", "token": "a", "token_file": "b"}, ValueError, "'token' or 'token_file', not both"),
        ({"url": "http://127.0.0.1:9", "token_file": "/no/token"}, FileNotFoundError, "reward.token_file: no such file"),
        ({"url": 5}, TypeError, "reward.url: expected a non-empty string"),
        ({"url": "http://127.0.0.1:9", "timeout": "soon"}, ValueError, "reward.timeout: expected a number of seconds"),
    ],
)
def test_build_reward_errors_name_the_key(spec, error, message):
    with pytest.raises(error, match=message):
        build_reward(spec)


def test_submit_returns_a_future_with_the_same_result(toy_batch):
    images, prompts = toy_batch
    reward_fn = LocalReward(FakeScorer(), weighting={"perspectives": {"bright": {"normalize": "running"}, "red": 1}})
    reference = LocalReward(FakeScorer(), weighting={"perspectives": {"bright": {"normalize": "running"}, "red": 1}})
    futures = [reward_fn.submit(images, prompts, None), reward_fn.submit(images[:3], prompts[:3], None)]
    assert all(isinstance(future, Future) for future in futures)
    # calls run in submission order, so the running statistics match sequential calls exactly
    torch.testing.assert_close(futures[0].result()[0], reference(images, prompts)[0])
    torch.testing.assert_close(futures[1].result()[0], reference(images[:3], prompts[:3])[0])


def test_async_reward_wraps_a_plain_callable(toy_batch):
    images, prompts = toy_batch

    def mean_red(images, prompts, metadata):
        return images[:, 0].mean(dim=(1, 2)), {}

    wrapped = AsyncReward(mean_red)
    future = wrapped.submit(images, prompts, None)
    torch.testing.assert_close(future.result()[0], images[:, 0].mean(dim=(1, 2)))
    torch.testing.assert_close(wrapped(images, prompts)[0], images[:, 0].mean(dim=(1, 2)))
    wrapped.close()


def test_non_finite_scores_become_nan_rewards_and_spare_the_rest(toy_batch):
    images, prompts = toy_batch

    class SometimesNaN(FakeScorer):
        def score(self, images, prompts, perspectives=None):
            scores = super().score(images, prompts, perspectives)
            scores["bright"] = scores["bright"].clone()
            scores["bright"][1] = float("nan")
            return scores

    rewards, _ = LocalReward(SometimesNaN(), weighting={"perspectives": {"bright": {"normalize": "batch"}}})(images, prompts)
    assert torch.isnan(rewards[1]) and torch.isfinite(rewards[[0, 2, 3, 4, 5]]).all()
