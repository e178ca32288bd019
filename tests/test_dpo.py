"""DiffusionDPOTrainer / DiffusionDPOConfig: the loss against its formula, the LoRA-disabled reference, offline
latents (cache, SDXL size conditioning), online pairs, flow-matching families (SD3, FLUX), exact resume, the CLI,
and learning on the toy world."""

from __future__ import annotations

import gc
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image

from reward.pairs import load_pairs
from rlhf.generators import load_generator
from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline
from rlhf.testing import build_tiny_flux, build_tiny_sd3
from rlhf.toy import colour_score, write_toy_datasets
from tests.conftest import assert_resumed_run_matches, reset_accelerator_state
from trainers.dpo import STAT_NAMES, DiffusionDPOConfig, DiffusionDPOTrainer, diffusion_dpo_loss, main
from trainers.dpo_pairs import PairBatch, PairLatents, build_preference_pairs

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


pytestmark = pytest.mark.usefixtures("isolated_accelerator")


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_toy_datasets(tmp_path_factory.mktemp("toy"), n=12, n_test=6, seed=0)["alignment"]


def colour_reward(images: torch.Tensor, prompts: list[str], metadata: list) -> tuple[torch.Tensor, dict]:
    scores = colour_score(images, prompts)
    return scores, {"raw": {"colour": scores}}


def prompt_cycle() -> tuple[str, dict]:
    return random.choice(PROMPTS), {}


def small_config(output_dir: Path, **overrides) -> DiffusionDPOConfig:
    options = dict(
        output_dir=str(output_dir), mixed_precision="no", num_epochs=2, sample_num_steps=3, sample_batch_size=4,
        sample_num_batches_per_epoch=2, group_size=4, train_batch_size=2, train_learning_rate=1e-3,
        eval_prompts=PROMPTS[:1], eval_seeds=[0, 1], num_grid_images=4,
    )
    return DiffusionDPOConfig(**{**options, **overrides})


def make_trainer(tiny_sd: Path, config: DiffusionDPOConfig, **kwargs) -> DiffusionDPOTrainer:
    return DiffusionDPOTrainer(
        config, DDPOStableDiffusionPipeline.from_pretrained(tiny_sd, lora_seed=config.seed),
        reward_function=colour_reward, prompt_function=prompt_cycle, **kwargs,
    )


def perturb_lora(pipeline: DDPOStableDiffusionPipeline, seed: int = 0) -> None:
    """A fresh LoRA B is zero (policy == reference); give it values so the two differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


# ------------------------------------------------------------------------------------------- the loss


FIXED = dict(  # per-pair denoising errors of two pairs: one the policy already prefers, one it does not
    model_chosen=[0.1203, 0.3100], model_rejected=[0.1251, 0.3050],
    reference_chosen=[0.1210, 0.3080], reference_rejected=[0.1240, 0.3075],
)


def expected_losses(loss_type: str, beta: float) -> list[float]:
    """Wallace et al.'s loss written out per pair in float64 Python, in the diffusers example's form
    (its beta_dpo = our beta / 2, no factor 1/2)."""
    beta_dpo = beta / 2
    losses = []
    for mw, ml, rw, rl in zip(*FIXED.values()):
        logits = (rw - rl) - (mw - ml)
        if loss_type == "sigmoid":
            losses.append(math.log1p(math.exp(-beta_dpo * logits)))
        elif loss_type == "hinge":
            losses.append(max(0.0, 1 - beta_dpo * logits))
        else:
            losses.append((logits - 1 / (2 * beta_dpo)) ** 2)
    return losses


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_equals_the_formula_on_fixed_tensors(loss_type: str) -> None:
    tensors = [torch.tensor(v, dtype=torch.float64) for v in FIXED.values()]
    losses, margin = diffusion_dpo_loss(*tensors, beta=5000.0, loss_type=loss_type)
    torch.testing.assert_close(losses, torch.tensor(expected_losses(loss_type, 5000.0), dtype=torch.float64))
    # Salesforce's form: inside = -beta/2 * (model_diff - ref_diff)
    model_diff, ref_diff = tensors[0] - tensors[1], tensors[2] - tensors[3]
    torch.testing.assert_close(margin, -0.5 * 5000.0 * (model_diff - ref_diff))
    assert margin[0] > 0 > margin[1]


def test_unknown_loss_type_is_refused() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_dpo_loss(*[torch.zeros(1)] * 4, beta=1.0, loss_type="square")


@pytest.mark.parametrize(("loss_type", "sft_weight"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_trainer_loss_equals_an_independent_computation(tiny_sd: Path, tmp_path: Path, loss_type: str, sft_weight: float) -> None:
    """The trainer's minibatch loss against one computed by hand: the policy UNet with a non-zero LoRA, a separately
    loaded base UNet as the reference, the same noise for both images of a pair, epsilon targets."""
    config = small_config(tmp_path, loss_type=loss_type, sft_weight=sft_weight, beta=200.0)
    trainer = make_trainer(tiny_sd, config)
    perturb_lora(trainer.sd_pipeline)
    pipeline = trainer.sd_pipeline
    generator = torch.Generator().manual_seed(3)
    chosen, rejected = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    conditioning = pipeline.encode_prompt(PROMPTS, guidance=False)
    batch = PairBatch(chosen, rejected, {k: torch.cat([v, v]) for k, v in conditioning.items()})
    loss, stats = trainer.pair_loss(batch, torch.Generator().manual_seed(7), with_grad=False)

    # documented draw order: the pairs' noise, then their timesteps
    draws = torch.Generator().manual_seed(7)
    noise = torch.randn(chosen.shape, generator=draws)
    timesteps = torch.randint(0, 1000, (2,), generator=draws)
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    alphas = pipeline.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    embeds = conditioning["prompt_embeds"]
    errors = {}
    with torch.no_grad():
        for role, latents in (("chosen", chosen), ("rejected", rejected)):
            noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
            for name, unet in (("model", pipeline.unet), ("reference", base)):
                prediction = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
                errors[f"{name}_{role}"] = ((prediction - noise) ** 2).mean(dim=(1, 2, 3)).double()
    assert not torch.allclose(errors["model_chosen"], errors["reference_chosen"])  # the LoRA matters
    beta_dpo = config.beta / 2
    logits = (errors["reference_chosen"] - errors["reference_rejected"]) - (errors["model_chosen"] - errors["model_rejected"])
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta_dpo * logits)
    elif loss_type == "hinge":
        per_pair = torch.clamp(1 - beta_dpo * logits, min=0)
    else:
        per_pair = (logits - 1 / (2 * beta_dpo)) ** 2
    expected = (per_pair + sft_weight * errors["model_chosen"]).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
    # the logged statistics: pair count, implicit accuracy from the margin's sign, per-image errors
    assert stats[-1] == 2
    assert stats[STAT_NAMES.index("implicit_accuracy")] == float((logits > 0).sum())
    for name, values in errors.items():
        torch.testing.assert_close(stats[STAT_NAMES.index(name.replace("_", "_mse_", 1))], values.sum(), rtol=1e-5, atol=1e-7)


def test_reference_pass_leaves_the_lora_and_its_gradients_untouched_and_adds_no_unet(tiny_sd: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_sd, small_config(tmp_path))
    pipeline = trainer.sd_pipeline
    perturb_lora(pipeline)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([100, 700])
    conditioning = pipeline.encode_prompt(PROMPTS, guidance=False)
    policy = pipeline.predict(latents, timesteps, conditioning, 1.0, denoiser=trainer.denoiser)
    policy.square().mean().backward()
    lora = {name: p for name, p in pipeline.unet.named_parameters() if "lora_" in name}
    weights = {name: p.detach().clone() for name, p in lora.items()}
    grads = {name: p.grad.clone() for name, p in lora.items()}
    assert any(g.abs().max() > 0 for g in grads.values())

    def unets() -> int:
        return sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())

    live_before, seen = unets(), []
    hook = pipeline.unet.register_forward_hook(lambda module, args, output: seen.append((id(module), unets())))
    reference = trainer.reference_prediction(latents, timesteps, conditioning)
    hook.remove()
    assert seen == [(id(pipeline.unet), live_before)]  # the policy's own UNet ran, and no other UNet exists
    assert not reference.requires_grad
    for name, parameter in lora.items():
        assert torch.equal(parameter, weights[name]), name
        assert torch.equal(parameter.grad, grads[name]), name
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    with torch.no_grad():
        expected = base(latents, timesteps, encoder_hidden_states=conditioning["prompt_embeds"]).sample
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-6)  # the reference is the base model
    with torch.no_grad():
        after = pipeline.predict(latents, timesteps, conditioning, 1.0, denoiser=trainer.denoiser)
    torch.testing.assert_close(after, policy.detach(), rtol=0, atol=0)  # the LoRA is back on


# ------------------------------------------------------------------------------------------- pairs and data


def test_preference_pairs_per_group() -> None:
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.5, float("nan"), 1.0, 1.0, 0.1])
    assert build_preference_pairs(rewards, 4, "best_worst") == [(1, 0), (5, 7)]
    assert build_preference_pairs(rewards, 4, "best_worst", margin=0.8) == [(5, 7)]
    assert build_preference_pairs(rewards, 4, "all") == [
        (1, 0), (2, 0), (3, 0), (1, 2), (1, 3), (5, 7), (6, 7),  # equal rewards never pair
    ]
    assert build_preference_pairs(torch.tensor([0.3, 0.3]), 2, "best_worst") == []
    with pytest.raises(ValueError, match="pair_strategy"):
        build_preference_pairs(rewards, 4, "random")


def test_latent_cache_matches_on_the_fly_encoding_and_is_reused(tiny_sd: Path, toy_pairs: dict, tmp_path: Path) -> None:
    pipeline = DDPOStableDiffusionPipeline.from_pretrained(tiny_sd)
    pairs = load_pairs(str(toy_pairs["train"]), "auto", "train", "", True, 0, "dataset")
    on_the_fly = PairLatents(pairs, pipeline, 32).batch([3, 0, 5])
    cached = PairLatents(pairs, pipeline, 32, tmp_path / "cache", encode_batch_size=5).batch([3, 0, 5])
    for name in ("chosen", "rejected"):
        torch.testing.assert_close(getattr(cached, name), getattr(on_the_fly, name), rtol=1e-3, atol=2e-3)  # float16 storage
    assert not torch.equal(cached.chosen, cached.rejected)
    torch.testing.assert_close(cached.conditioning["prompt_embeds"], on_the_fly.conditioning["prompt_embeds"])

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    pipeline.vae.encode = refuse
    reused = PairLatents(pairs, pipeline, 32, tmp_path / "cache")
    assert torch.equal(reused.batch([3, 0, 5]).chosen, cached.chosen)
    with pytest.raises(ValueError, match="latent_cache_dir"):
        PairLatents(pairs[:5], pipeline, 32, tmp_path / "cache")  # other pairs: refused, not overwritten


def test_pickapic_dataset_is_read_row_by_row_with_ties_dropped(tiny_sd: Path, tmp_path: Path) -> None:
    import io

    import datasets

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    columns = {"caption": PROMPTS * 2, "jpg_0": [png(10), png(20), png(30), png(40)],
               "jpg_1": [png(110), png(120), png(130), png(140)], "label_0": [1.0, 0.0, 0.5, 1.0]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)}).save_to_disk(tmp_path / "pickapic")
    pairs = load_pairs(str(tmp_path / "pickapic"), "auto", "train", "", True, 0, "dataset")
    assert len(pairs) == 3  # the tie (label_0 0.5) is dropped
    assert [pair.prompt for pair in pairs] == [PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert np.asarray(pairs[1].chosen.load())[0, 0, 0] == 120  # label_0 0: the second image is preferred
    assert len(load_pairs(str(tmp_path / "pickapic"), "pickapic", "train", "", False, 2, "dataset")) == 2
    latents = PairLatents(pairs, DDPOStableDiffusionPipeline.from_pretrained(tiny_sd), 32, tmp_path / "cache")
    assert latents.batch([2, 0]).chosen.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="split"):
        load_pairs(str(tmp_path / "pickapic"), "auto", "validation", "", True, 0, "dataset")


def test_every_dpo_config_parses_and_validates() -> None:
    from rlhf.config import parse_config

    for path in sorted((ROOT / "configs" / "dpo").glob("*.yaml")):
        (config,) = parse_config(DiffusionDPOConfig, ["--config", str(path)])
        config.validate()


def test_sdxl_pairs_carry_size_and_crop_conditioning(tmp_path: Path) -> None:
    from reward.data import ImageRef, PairExample
    from tests.test_pipeline import tiny_sdxl

    wide = Image.fromarray(np.full((32, 48, 3), 200, dtype=np.uint8))
    tall = Image.fromarray(np.full((64, 32, 3), 30, dtype=np.uint8))
    pairs = [PairExample(PROMPTS[0], ImageRef(image=wide), ImageRef(image=tall))]
    config = small_config(tmp_path, mode="offline", dataset="unused", train_batch_size=1, num_epochs=1, reward={})
    trainer = DiffusionDPOTrainer(config, DDPOStableDiffusionPipeline(tiny_sdxl()), train_pairs=pairs, eval_pairs=pairs)
    batch = trainer.train_data.batch([0])
    # (original height, width, crop top, crop left, target height, width) per image: chosen, then rejected
    assert batch.conditioning["add_time_ids"].tolist() == [[32, 48, 0, 8, 32, 32], [64, 32, 16, 0, 32, 32]]
    assert {"pooled_prompt_embeds", "prompt_embeds"} <= set(batch.conditioning)
    metrics = trainer.train()
    assert metrics["heldout_before"]["implicit_accuracy"] == 0.5
    assert trainer.global_step == 1 and math.isfinite(trainer.last_row["loss"])
    assert any(p.abs().max() > 0 for n, p in trainer.sd_pipeline.policy_state_dict().items() if "lora_B" in n)


@pytest.fixture(scope="module")
def tiny_flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_flow")
    return {"sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux")}


@pytest.mark.parametrize("mode", ["offline", "online"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_dpo_step_on_a_flow_family(tiny_flow: dict, toy_pairs: dict, tmp_path: Path, family: str, mode: str) -> None:
    """Diffusion-DPO through the adapter interface only: offline pairs encoded by the family's VAE (FLUX packed),
    online pairs from its own samples; the velocity target; the reference (LoRA off) equals the initial policy."""
    policy = load_generator(tiny_flow[family], lora_seed=0)
    config = small_config(
        tmp_path, mode=mode, num_epochs=1, dataset=str(toy_pairs["train"]), eval_dataset=str(toy_pairs["test"]),
        train_steps_per_epoch=1, sample_num_steps=2, sample_eta=0.7, eval_prompts=[],
    )
    trainer = DiffusionDPOTrainer(config, policy, reward_function=colour_reward, prompt_function=prompt_cycle)
    initial = policy.policy_state_dict()
    metrics = trainer.train()
    before = metrics["heldout_before"]
    assert before["implicit_accuracy"] == 0.5 and before["num_pairs"] == 6
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)  # every margin 0: -log sigmoid(0)
    row = trainer.last_row
    assert trainer.global_step == 1 and row["num_pairs"] > 0 and math.isfinite(row["loss"])
    assert row["model_mse_chosen"] > 0 and math.isfinite(metrics["heldout_after"]["loss"])
    changed = [name for name, value in policy.policy_state_dict().items() if not torch.equal(value, initial[name])]
    assert any("lora_B" in name for name in changed)


def test_flow_pairs_are_the_vae_latents_in_the_transformers_layout(tiny_flow: dict, toy_pairs: dict) -> None:
    pairs = load_pairs(str(toy_pairs["train"]), "auto", "train", "", True, 0, "dataset")
    for family in ("sd3", "flux"):
        policy = load_generator(tiny_flow[family])
        batch = PairLatents(pairs, policy, 32).batch([0, 2])
        assert batch.chosen.shape == policy.latent_shape(2, 32, 32)  # FLUX: [2, tokens, channels]
        images = policy.decode(batch.chosen)  # the layout the decoder (and the transformer) reads back
        assert images.shape == (2, 3, 32, 32)


def test_online_round_writes_its_pairs_with_rewards(tiny_sd: Path, tmp_path: Path) -> None:
    from reward.data import load_preferences

    trainer = make_trainer(tiny_sd, small_config(tmp_path, num_epochs=1, pair_strategy="all"))
    trainer.train()
    row = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[0])
    path = tmp_path / "pairs" / "round_0000.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == row["round_pairs"] > 0
    assert all(r["chosen_reward"] > r["rejected_reward"] and r["chosen_scores"]["colour"] == r["chosen_reward"] for r in rows)
    assert load_preferences(path).summary()["pairs"] == len(rows)  # an audit file is also an offline dataset
    assert row["num_pairs"] == row["round_pairs"]  # one pass: every pair of the round trained on once


def test_config_documents_every_field() -> None:
    fields = DiffusionDPOConfig.__dataclass_fields__
    assert all(fields[name].metadata.get("help") for name in fields)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"loss_type": "square"}, "loss_type"),
        ({"beta": 0.0}, "beta"),
        ({"mode": "batch"}, "mode"),
        ({"group_size": 1}, "group_size"),
        ({"group_size": 3}, "group_size"),
        ({"pair_strategy": "random"}, "pair_strategy"),
        ({"mode": "offline"}, "dataset"),
        ({"reward": {}}, "reward"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"train_lr_warmup_steps": 200}, "train_lr_warmup_steps"),  # with the default "constant" schedule
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        small_config(tmp_path, **overrides).validate()


# ------------------------------------------------------------------------------------------- resume and CLI


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_resumed_run_ends_with_the_uninterrupted_runs_lora(tiny_sd: Path, toy_pairs: dict, tmp_path: Path, mode: str) -> None:
    overrides = dict(
        mode=mode, num_epochs=2, dataset=str(toy_pairs["train"]), eval_dataset=str(toy_pairs["test"]),
        train_steps_per_epoch=2, train_gradient_accumulation_steps=2, train_num_inner_epochs=2, sft_weight=0.1,
        train_lr_scheduler="cosine",
    )
    uninterrupted = make_trainer(tiny_sd, small_config(tmp_path / "a", **overrides))
    uninterrupted.train()
    expected = uninterrupted.sd_pipeline.policy_state_dict()
    reset_accelerator_state()

    interrupted = make_trainer(tiny_sd, small_config(tmp_path / "b", **overrides))
    original_step = interrupted.training_step

    def crash_in_second_epoch(batches, generator):
        if interrupted.last_row:  # set once the first epoch is done and checkpointed
            raise KeyboardInterrupt("simulated interruption")
        return original_step(batches, generator)

    interrupted.training_step = crash_in_second_epoch
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    reset_accelerator_state()

    resumed = make_trainer(tiny_sd, small_config(tmp_path / "b", resume_from=str(tmp_path / "b"), **overrides))
    assert resumed.first_epoch == 1
    resumed.train()
    assert_resumed_run_matches(resumed.sd_pipeline, expected, tmp_path / "a", tmp_path / "b")


TWO_PROCESS_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline
from tests.test_dpo import colour_reward, prompt_cycle, small_config
from trainers.dpo import DiffusionDPOTrainer

torch.set_num_threads(1)
out, mode = sys.argv[2], sys.argv[4]
config = small_config(out, mode=mode, num_epochs=1, eval_seeds=[0, 1, 2], dataset=sys.argv[3] + "/train.jsonl",
                      eval_dataset=sys.argv[3] + "/test.jsonl", train_steps_per_epoch=2, pair_strategy="all")
trainer = DiffusionDPOTrainer(config, DDPOStableDiffusionPipeline.from_pretrained(sys.argv[1]),
                              reward_function=colour_reward, prompt_function=prompt_cycle)
trainer.train()
save_file(trainer.sd_pipeline.policy_state_dict(), f"{out}/rank{trainer.accelerator.process_index}.safetensors")
assert trainer.accelerator.num_processes == 2
"""


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_two_cpu_processes_end_with_identical_lora(tiny_sd: Path, toy_pairs: dict, tmp_path: Path, mode: str) -> None:
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "two_process.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    # `accelerate launch --num_processes 2 --cpu` (accelerate 1.15) starts one process without MPI; torchrun with
    # ACCELERATE_USE_CPU gives two gloo ranks
    command = [
        str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", str(script), str(tiny_sd),
        str(tmp_path / "run"), str(toy_pairs["train"].parent), mode,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (load_file(tmp_path / "run" / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert any(rank0[name].abs().max() > 0 for name in rank0 if "lora_B" in name)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_before"]["num_seeds"] == 3  # seeds shared out over both processes, then gathered
    assert metrics["heldout_before"]["implicit_accuracy"] == 0.5 and metrics["heldout_before"]["num_pairs"] == 6
    row = json.loads((tmp_path / "run" / "history.jsonl").read_text())
    assert row["num_pairs"] > 0 and (mode == "online" or row["num_pairs"] == 2 * 2 * 2)  # steps x pairs x processes
    if mode == "online":  # each process wrote its own pairs
        assert (tmp_path / "run" / "pairs" / "round_0000_rank1.jsonl").is_file()


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_cli_writes_history_metrics_grids_and_lora(tmp_path: Path, toy_pairs: dict, mode: str) -> None:
    output = tmp_path / "cli"
    # offline: toy alignment pairs (no shipped config: on the toy generator they lowered the oracle, see README)
    offline = ["--mode", "offline", "--dataset", str(toy_pairs["train"]), "--eval_dataset", str(toy_pairs["test"]),
               "--max_eval_pairs", "4"]
    code = main([
        "--config", str(ROOT / "configs/dpo/tiny.yaml"), "--pretrained_model", "tiny", "--output_dir", str(output),
        "--num_epochs", "1", "--sample_num_steps", "2", "--sample_num_batches_per_epoch", "1", "--eval_seeds", "0", "1",
        "--eval_prompts", *PROMPTS, "--train_steps_per_epoch", "1", *(offline if mode == "offline" else []),
    ])
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    for key in ("eval_before", "eval_after"):
        assert set(metrics[key]) >= {"reward_mean", "reward_std", "per_perspective", "per_perspective_std"}
        # the tiny config's held-out rewards: the toy oracles
        assert {"heldout/alignment", "heldout/colour", "heldout/shape"} <= set(metrics[key]["per_perspective"])
    if mode == "offline":
        assert metrics["heldout_before"]["implicit_accuracy"] == 0.5 and metrics["heldout_before"]["num_pairs"] == 4
    else:
        assert (output / "pairs" / "round_0000.jsonl").is_file() and (output / "samples" / "epoch_0000.png").is_file()
    assert len((output / "history.jsonl").read_text().splitlines()) == 1
    for name in ("eval_before.png", "eval_after.png", "training_curves.png", "config.yaml", "lora/pytorch_lora_weights.safetensors"):
        assert (output / name).is_file(), name


def test_cli_rejects_an_unknown_key_and_a_missing_dataset(tmp_path: Path) -> None:
    from trainers.cli import main as rlhf_main

    assert rlhf_main(["train", "dpo", "--config", str(ROOT / "configs/dpo/tiny.yaml"), "--not_a_field", "1"]) == 2
    assert rlhf_main([
        "train", "dpo", "--config", str(ROOT / "configs/dpo/tiny.yaml"), "--pretrained_model", "tiny", "--mode",
        "offline", "--output_dir", str(tmp_path), "--dataset", str(tmp_path / "missing.jsonl"),
    ]) == 2


# ------------------------------------------------------------------------------------------- learning


def toy_generator() -> Path:
    from rlhf.toy.generators import toy_generator_path

    try:
        return toy_generator_path()
    except FileNotFoundError:
        pytest.skip("the toy generator is not committed yet (rlhf toy pretrain)")


@pytest.mark.slow
def test_online_dpo_raises_the_toy_reward_by_more_than_three_std(tmp_path: Path) -> None:
    from rlhf.config import parse_config
    from trainers.command import load_training_prompts, uniform_prompt_function

    # configs/dpo/tiny.yaml (without its held-out oracles): 24 rounds of 16 prompts x 4 images, best vs worst of each
    # prompt, two passes over the pairs. Measured on a toy generator: eval reward +0.043..+0.056 over seeds 0-2,
    # 3 std = 0.028; on the committed one 0.467 +- 0.014 -> 0.576 +- 0.025 (seed 0).
    (config,) = parse_config(
        [DiffusionDPOConfig],
        ["--config", str(ROOT / "configs/dpo/tiny.yaml"), "--output_dir", str(tmp_path), "--heldout_rewards", "{}"],
    )
    trainer = DiffusionDPOTrainer(
        config, DDPOStableDiffusionPipeline.from_pretrained(toy_generator()), reward_function=colour_reward,
        prompt_function=uniform_prompt_function(load_training_prompts(config)),
    )
    metrics = trainer.train()
    before, after = metrics["eval_before"], metrics["eval_after"]
    margin = 3 * max(before["reward_std"], after["reward_std"])
    assert after["reward_mean"] - before["reward_mean"] > margin, metrics


@pytest.mark.slow
def test_offline_dpo_raises_heldout_implicit_accuracy_above_chance(tmp_path: Path) -> None:
    # the toy world's alignment pairs as the trainer's former 'toy:alignment' wrote them (seed = the run's seed)
    pairs = write_toy_datasets(tmp_path / "toy_data", n=256, n_test=128, seed=0)["alignment"]
    config = DiffusionDPOConfig(
        output_dir=str(tmp_path / "run"), mode="offline", mixed_precision="no", seed=0, num_epochs=4,
        dataset=str(pairs["train"]), eval_dataset=str(pairs["test"]), train_batch_size=16, train_learning_rate=3e-3,
        heldout_noise_draws=4, reward={},
    )
    trainer = DiffusionDPOTrainer(config, DDPOStableDiffusionPipeline.from_pretrained(toy_generator()))
    metrics = trainer.train()
    assert metrics["heldout_before"]["implicit_accuracy"] == 0.5  # the policy starts as the reference
    # 128 held-out pairs: a chance-level policy's accuracy has std <= 0.044 (a pair's 4 draws counted as one), so
    # 0.65 is > 3 std above chance; measured 0.72-0.73 (seeds 0, 1)
    assert metrics["heldout_after"]["implicit_accuracy"] > 0.65, metrics
