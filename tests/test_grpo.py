"""GRPOTrainer / GRPOConfig: advantage and loss arithmetic by hand, ratio 1 on replay, the KL to the reference, the
SDE window, end to end on tiny SD (DDIM), SD3 and FLUX, exact resume, two processes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.generators import load_generator
from rlhf.generators.sampling import sde_window
from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline
from rlhf.testing import build_tiny_sd3
from tests.conftest import assert_resumed_run_matches, reset_accelerator_state
from tests.test_ddpo import (
    PROMPTS, assert_ranks_hold_one_trained_lora, colour_reward, prompt_cycle, run_on_two_cpu_processes,
)
from trainers import GRPOConfig, GRPOTrainer
from trainers.grpo_loss import clipped_policy_loss, gaussian_step_kl, grpo_advantages
from trainers.grpo import main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("isolated_accelerator")


def small_config(output_dir: Path, **overrides) -> GRPOConfig:
    options = dict(output_dir=str(output_dir), num_epochs=2, sample_num_steps=3, sample_batch_size=4,
                   sample_num_batches_per_epoch=1, num_images_per_prompt=2, train_batch_size=2, noise_level=1.0,
                   train_learning_rate=3e-3, train_clip_range=1e-2, num_grid_images=4)
    return GRPOConfig(**{**options, **overrides})


def make_trainer(path: Path, config: GRPOConfig, hook=None) -> GRPOTrainer:
    return GRPOTrainer(config, colour_reward, prompt_cycle, DDPOStableDiffusionPipeline.from_pretrained(path),
                       image_samples_hook=hook)


# ------------------------------------------------------------------------------------------- arithmetic


def test_group_advantages_by_hand_with_group_and_global_std() -> None:
    rewards, groups = [1.0, 3.0, 2.0, 2.0, 0.0, 4.0], [0, 0, 1, 1, 2, 2]
    # group 0: mean 2, std 1; group 1: constant (advantage 0); group 2: mean 2, std 2
    assert torch.allclose(grpo_advantages(rewards, groups), torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]), atol=1e-5)
    # global std: population std of all six rewards = sqrt(((1 + 1 + 0 + 0 + 4 + 4) / 6)) = sqrt(10 / 6)
    scale = (10 / 6) ** 0.5
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]) / scale
    assert torch.allclose(grpo_advantages(rewards, groups, global_std=True), expected, atol=1e-5)


def test_clipped_loss_and_kl_by_hand() -> None:
    advantages = torch.tensor([[10.0], [-10.0], [1.0]])  # clipped to +-5
    old = torch.zeros(3, 1)
    new = torch.log(torch.tensor([[1.5], [1.5], [1.0]]))
    loss, ratio = clipped_policy_loss(new, old, advantages, clip_range=0.2, adv_clip_max=5.0)
    assert torch.allclose(ratio, torch.tensor([[1.5], [1.5], [1.0]]))
    # A = 5, r = 1.5: max(-7.5, -5 * 1.2) = -6; A = -5, r = 1.5: max(7.5, 6) = 7.5; A = 1, r = 1: -1
    assert torch.allclose(loss, torch.tensor([[-6.0], [7.5], [-1.0]]))
    mean, reference, std = torch.ones(2, 4), torch.zeros(2, 4), torch.full((2, 1), 2.0)
    mean[1] = 0
    assert torch.allclose(gaussian_step_kl(mean, reference, std), torch.tensor([1 / 8, 0.0]))


def test_sde_window_draws_consecutive_steps_in_its_range() -> None:
    generator = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(40):
        mask = sde_window(10, 3, [2, 4], generator)
        index = mask.nonzero().squeeze(1)
        assert len(index) == 3 and (index.diff() == 1).all()
        starts.add(int(index[0]))
    assert starts == {2, 3, 4}
    assert sde_window(5, 0, [], generator).all()
    with pytest.raises(ValueError, match="sde_window_range"):
        sde_window(10, 3, [5, 8], generator)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"num_images_per_prompt": 3}, "num_images_per_prompt"), ({"num_images_per_prompt": 1}, "num_images_per_prompt"),
     ({"noise_level": 0.0}, "noise_level"), ({"sde_window_size": 4}, "sde_window_size"),
     ({"sde_window_size": 2, "sde_window_range": [0, 2]}, "sde_window_range"), ({"kl_coef": -1.0}, "kl_coef"),
     ({"global_std": True, "per_prompt_stat_tracking": True}, "global_std"), ({"ema_decay": 1.0}, "ema_decay"),
     ({"train_batch_size": 3}, "train_batch_size"), ({"heldout_rewards": {"x": 1}}, "heldout_rewards")],
)
def test_config_errors_name_the_field(tmp_path: Path, overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        small_config(tmp_path, **overrides).validate()


# ------------------------------------------------------------------------------------------- the policy


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_replay_of_the_unchanged_policy_has_ratio_one_and_kl_zero_until_a_step(
    tiny_sd: Path, tmp_path: Path, family: str
) -> None:
    config = small_config(tmp_path / "run", kl_coef=0.1, sde_window_size=2)
    if family == "sd":
        trainer = make_trainer(tiny_sd, config)
    else:  # the flow SDE through the same trainer code
        generator = load_generator(build_tiny_sd3(tmp_path / "tiny_sd3"), sde_type="flow_sde")
        trainer = GRPOTrainer(config, colour_reward, prompt_cycle, generator)
    rollout, _ = trainer.sample_epoch(0)
    trainer.compute_advantages(rollout)
    tensors = rollout.tensors
    assert tensors["log_probs"].shape == (4, 2)  # only the window's 2 steps are kept
    rows, columns = torch.arange(4), torch.arange(2).repeat(4, 1)
    trainer.sd_pipeline.set_timesteps(3, trainer.height, trainer.width)
    with torch.no_grad():
        log_probs, kl = trainer.replay(tensors, rows, columns)
        # one step per call, the batch sampling ran: the very computation, so the ratio is exactly 1
        per_step = torch.cat([trainer.replay(tensors, rows, columns[:, [j]])[0] for j in range(2)], dim=1)
    assert torch.equal(per_step, tensors["log_probs"])
    # all 4 x 2 pairs in one call: 1 up to float32 rounding (CPU kernels round per batch shape)
    assert (torch.exp(log_probs - tensors["log_probs"]) - 1).abs().max() < 1e-5
    assert torch.equal(kl, torch.zeros_like(kl))  # LoRA B starts at zero: the policy is the reference
    stats = trainer.train_epoch(0, tensors)
    assert stats["ratio_min"] <= stats["ratio_mean"] <= stats["ratio_max"]
    with torch.no_grad():
        _, kl = trainer.replay(tensors, rows, columns)
    assert kl.min() > 0


@pytest.mark.parametrize("same", [False, True])
def test_same_initial_noise_shares_a_groups_first_latents(tiny_sd: Path, tmp_path: Path, same: bool) -> None:
    # 8 images in 2 batches of 4, groups of 4: with same_initial_noise each group starts from one noise
    trainer = make_trainer(tiny_sd, small_config(tmp_path, same_initial_noise=same, sample_num_batches_per_epoch=2,
                                                 num_images_per_prompt=4))
    rollout, _ = trainer.sample_epoch(0)
    first = rollout.tensors["latents"][:, 0]
    assert torch.equal(first[0], first[3]) == same and torch.equal(first[4], first[7]) == same
    assert not torch.equal(first[0], first[4])
    assert not torch.equal(rollout.tensors["next_latents"][0, 0], rollout.tensors["next_latents"][1, 0])


def test_train_two_epochs_writes_history_metrics_curves_and_heldout(tiny_sd: Path, tmp_path: Path) -> None:
    config = small_config(tmp_path, kl_coef=0.05, ema_decay=0.5, eval_prompts=PROMPTS, eval_seeds=[0], eval_freq=1,
                          eval_num_steps=4, heldout_rewards={"alignment": {"builtin": "toy_alignment"}})
    trainer = make_trainer(tiny_sd, config)
    trainer.write_curves = True  # as the command does
    metrics = trainer.train()
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [0, 1]
    for key in ("reward_mean", "reward_std", "approx_kl", "clipfrac", "ratio_mean", "ratio_min", "ratio_max", "kl",
                "eval_reward_mean", "eval_heldout/alignment", "time_sampling", "time_reward", "time_training"):
        assert key in history[-1], key
    assert history[-1]["kl"] > 0 and history[-1]["approx_kl"] > 0
    for stage in ("eval_before", "eval_after"):
        assert "heldout/alignment" in metrics[stage]["per_perspective"]
    for name in ("training_curves.png", "eval_before_after.png", "lora/pytorch_lora_weights.safetensors"):
        assert (tmp_path / name).is_file(), name
    exported = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert any(value.abs().max() > 0 for name, value in exported.items() if "lora.up" in name)
    # the EMA lags the trained weights, and the trained ones are back in place after the EMA export
    assert any(not torch.equal(s, p) for s, p in zip(trainer.ema.shadow, trainer.trainable))


def test_no_evaluation_without_eval_prompts(tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("evaluated without eval_prompts")

    monkeypatch.setattr("trainers.base.evaluate", fail)
    metrics = make_trainer(tiny_sd, small_config(tmp_path, num_epochs=1)).train()
    assert metrics["eval_before"] is None and metrics["eval_after"] is None
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_resumed_run_ends_with_the_uninterrupted_runs_lora(tiny_sd: Path, tmp_path: Path) -> None:
    # every stateful part on: inner epochs, the per-prompt tracker, KL, EMA, a moving window, async rewards
    overrides = dict(train_num_inner_epochs=2, per_prompt_stat_tracking=True, per_prompt_stat_tracking_min_count=2,
                     kl_coef=0.1, ema_decay=0.5, sde_window_size=2, async_reward_computation=True)
    uninterrupted = make_trainer(tiny_sd, small_config(tmp_path / "a", **overrides))
    uninterrupted.train()
    expected = uninterrupted.sd_pipeline.policy_state_dict()
    expected_ema = [value.clone() for value in uninterrupted.ema.shadow]
    reset_accelerator_state()

    def crash_in_second_epoch(records, global_step, tracker):
        if global_step > 0:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tiny_sd, small_config(tmp_path / "b", **overrides), hook=crash_in_second_epoch).train()
    reset_accelerator_state()
    resumed = make_trainer(tiny_sd, small_config(tmp_path / "b", resume_from=str(tmp_path / "b"), **overrides))
    assert resumed.first_epoch == 1
    resumed.train()
    assert_resumed_run_matches(resumed.sd_pipeline, expected, tmp_path / "a", tmp_path / "b")
    for value, reference in zip(resumed.ema.shadow, expected_ema):
        assert torch.equal(value, reference)


# ------------------------------------------------------------------------------------------- the command

CLI_FAST = ["--num_epochs", "1", "--sample_num_steps", "3", "--eval_num_steps", "4", "--sample_batch_size", "4",
            "--sample_num_batches_per_epoch", "1", "--num_images_per_prompt", "2", "--train_batch_size", "2",
            "--eval_seeds", "0", "--eval_prompts", *PROMPTS]


@pytest.mark.parametrize("model", ["tiny", "tiny-sd3", "tiny-flux", "toy-flow"])
def test_cli_runs_every_family_end_to_end(tmp_path: Path, model: str) -> None:
    output = tmp_path / model
    code = main(["--config", str(ROOT / "configs/grpo/tiny.yaml"), "--pretrained_model", model,
                 "--output_dir", str(output), *CLI_FAST])
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["eval_after"]["per_perspective"]) == {
        "colour", "heldout/alignment", "heldout/colour", "heldout/shape", "heldout/fidelity"}
    row = json.loads((output / "history.jsonl").read_text().splitlines()[0])
    assert row["ratio_max"] >= row["ratio_min"] > 0 and row["approx_kl"] > 0
    assert (output / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (output / "training_curves.png").is_file()


def test_cli_rejects_an_unknown_key() -> None:
    from trainers.cli import main as rlhf_main

    assert rlhf_main(["train", "grpo", "--config", str(ROOT / "configs/grpo/tiny.yaml"), "--not_a_field", "1"]) == 2


def test_every_shipped_config_parses_and_validates() -> None:
    from rlhf.config import parse_config
    from trainers import GeneratorArguments

    for path in sorted((ROOT / "configs/grpo").glob("*.yaml")):
        _, config = parse_config([GeneratorArguments, GRPOConfig], ["--config", str(path)])
        config.validate()


TWO_PROCESS_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline
from rlhf.testing import build_tiny_sd3
from tests.test_grpo import colour_reward, prompt_cycle, small_config
from trainers import GRPOTrainer

torch.set_num_threads(1)
out = sys.argv[2]
config = small_config(out, kl_coef=0.1, sde_window_size=2, eval_prompts=["a red circle on a white background"],
                      eval_seeds=[0, 1, 2])
trainer = GRPOTrainer(config, colour_reward, prompt_cycle, DDPOStableDiffusionPipeline.from_pretrained(sys.argv[1]))
trainer.train()
save_file(trainer.sd_pipeline.policy_state_dict(), f"{out}/rank{trainer.accelerator.process_index}.safetensors")
if trainer.accelerator.is_main_process:
    open(f"{out}/ranks.txt", "w").write(f"num_processes={trainer.accelerator.num_processes}")
"""


def test_two_cpu_processes_end_with_identical_lora(tiny_sd: Path, tmp_path: Path) -> None:
    run = run_on_two_cpu_processes(TWO_PROCESS_SCRIPT, tiny_sd, tmp_path)
    assert_ranks_hold_one_trained_lora(run)
    assert json.loads((run / "metrics.json").read_text())["eval_before"]["num_seeds"] == 3
