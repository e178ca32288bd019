"""DDPOStableDiffusionPipeline on tiny random SD and SDXL pipelines: recorded trajectories, seeds, sizes, LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from rlhf.generators import GeneratorAdapter
from rlhf.generators.sampling import replay_steps, sample_trajectories
from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline, DefaultDDPOStableDiffusionPipeline
from rlhf.generators.scheduling import ddim_step_with_logprob
from rlhf.testing import TEXT_MAX_LENGTH, build_tiny_tokenizer

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
STEPS = 4


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny models are latency-bound; extra threads only contend on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(path: Path, **kwargs) -> DDPOStableDiffusionPipeline:
    pipeline = DDPOStableDiffusionPipeline.from_pretrained(path, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def perturb_lora(pipeline: GeneratorAdapter, seed: int = 0) -> None:
    """LoRA B starts at zero (a no-op adapter); give every LoRA weight a visible random value (any family)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in pipeline.trainable_parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def sample(pipeline: DDPOStableDiffusionPipeline, seed: int = 0, **kwargs):
    options = {"num_inference_steps": STEPS, "guidance_scale": 5.0, "generator": torch.Generator().manual_seed(seed)}
    return pipeline(PROMPTS, **{**options, **kwargs})


def test_call_records_every_step(tiny_sd: Path) -> None:
    pipeline = load(tiny_sd)
    output = sample(pipeline)
    assert output.images.shape == (2, 3, 32, 32) and output.images.dtype == torch.float32
    assert 0 <= output.images.min() and output.images.max() <= 1
    assert len(output.latents) == STEPS + 1 and output.latents[0].shape == (2, 4, 8, 8)
    assert len(output.log_probs) == STEPS and output.log_probs[0].shape == (2,)
    assert output.timesteps.tolist() == pipeline.scheduler.timesteps.tolist()
    assert set(output.conditioning) == {"prompt_embeds", "negative_prompt_embeds"}
    assert output.prompt_embeds.shape == output.negative_prompt_embeds.shape == (2, TEXT_MAX_LENGTH, 32)
    # guidance off: no unconditional half
    assert set(sample(pipeline, guidance_scale=1.0).conditioning) == {"prompt_embeds"}


def test_every_draw_comes_from_the_generator(tiny_sd: Path) -> None:
    pipeline = load(tiny_sd)
    torch.manual_seed(123)
    first = sample(pipeline, seed=5)
    torch.manual_seed(456)  # a different global RNG state must not matter
    second = sample(pipeline, seed=5)
    third = sample(pipeline, seed=6)
    for a, b in zip(first.latents, second.latents):
        assert torch.equal(a, b)
    assert torch.equal(first.images, second.images)
    assert not torch.equal(first.latents[-1], third.latents[-1])


def test_height_and_width_are_honoured(tiny_sd: Path) -> None:
    pipeline = load(tiny_sd)
    output = sample(pipeline, height=48, width=64)
    assert output.images.shape == (2, 3, 48, 64) and output.latents[0].shape == (2, 4, 12, 16)
    with pytest.raises(ValueError, match="height/width"):
        sample(pipeline, height=36, width=32)


def test_batched_replay_reproduces_the_recorded_log_probs(tiny_sd: Path) -> None:
    """All (sample, timestep) pairs in one UNet call give back the log-probs recorded while sampling."""
    pipeline = load(tiny_sd)
    perturb_lora(pipeline)
    output = sample(pipeline)
    latents = torch.stack(output.latents, dim=1)
    pairs = 2 * STEPS
    conditioning = {k: v.repeat_interleave(STEPS, dim=0) for k, v in output.conditioning.items()}
    timesteps = output.timesteps.repeat(2)
    with torch.no_grad():
        prediction = pipeline.predict(latents[:, :-1].reshape(pairs, 4, 8, 8), timesteps, conditioning, 5.0)
    _, replayed = ddim_step_with_logprob(
        pipeline.scheduler,
        prediction,
        timesteps,
        latents[:, :-1].reshape(pairs, 4, 8, 8),
        prev_sample=latents[:, 1:].reshape(pairs, 4, 8, 8),
    )
    torch.testing.assert_close(replayed.view(2, STEPS), torch.stack(output.log_probs, dim=1), rtol=0, atol=1e-5)


def test_sampled_trajectories_replay_with_grad(tiny_sd: Path) -> None:
    """Sampling runs in inference mode, yet what it returns enters a training graph (inference tensors cannot)."""
    pipeline = load(tiny_sd)
    perturb_lora(pipeline)
    drawn = sample_trajectories(pipeline, PROMPTS, num_steps=STEPS, guidance_scale=5.0, noise_level=1.0, height=32,
                                width=32, generator=torch.Generator().manual_seed(0))
    returned = [drawn.latents, drawn.log_probs, drawn.images, *drawn.conditioning.values()]
    assert not any(tensor.is_inference() for tensor in returned)
    conditioning = {k: v.repeat_interleave(STEPS, dim=0) for k, v in drawn.conditioning.items()}
    log_probs, _, _ = replay_steps(pipeline, drawn.latents[:, :-1].flatten(0, 1), drawn.latents[:, 1:].flatten(0, 1),
                                   drawn.timesteps.repeat(2), conditioning, guidance_scale=5.0, noise_level=1.0)
    log_probs.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pipeline.trainable_parameters())
    torch.testing.assert_close(log_probs.detach().view(2, STEPS), drawn.log_probs, rtol=0, atol=1e-5)


def test_negative_prompt_changes_the_samples(tiny_sd: Path) -> None:
    pipeline = load(tiny_sd)
    plain = sample(pipeline)
    negative = sample(pipeline, negative_prompt="a green triangle")
    assert not torch.equal(plain.latents[-1], negative.latents[-1])


def test_lora_is_the_only_trainable_part_and_stays_float32(tiny_sd: Path) -> None:
    pipeline = load(tiny_sd)
    names = [n for n, p in pipeline.unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any(p.requires_grad for p in pipeline.vae.parameters())
    assert not any(p.requires_grad for p in pipeline.text_encoder.parameters())
    before = [p.detach().clone() for p in pipeline.trainable_parameters()]
    pipeline.to(dtype=torch.bfloat16)
    assert pipeline.unet.conv_in.weight.dtype == torch.bfloat16 and pipeline.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in pipeline.trainable_parameters())
    # not rounded through bf16 on the way
    assert all(torch.equal(a, b) for a, b in zip(before, pipeline.trainable_parameters()))
    output = sample(pipeline)
    assert output.latents[-1].dtype == torch.float32 and torch.isfinite(output.images).all()


def test_reference_policy_runs_without_the_lora(tiny_sd: Path) -> None:
    pipeline = load(tiny_sd)
    base = load(tiny_sd, use_lora=False)
    perturb_lora(pipeline)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = pipeline.encode_prompt(PROMPTS)
    with torch.no_grad():
        with_lora = pipeline.predict(latents, 500, conditioning, 5.0)
        with pipeline.reference_policy():
            reference = pipeline.predict(latents, 500, conditioning, 5.0)
        expected = base.predict(latents, 500, conditioning, 5.0)
        after = pipeline.predict(latents, 500, conditioning, 5.0)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(with_lora, reference)
    assert torch.equal(with_lora, after)


def test_exported_lora_loads_into_a_plain_diffusers_pipeline(tiny_sd: Path, tmp_path: Path) -> None:
    pipeline = load(tiny_sd)
    perturb_lora(pipeline)
    pipeline.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    plain = StableDiffusionPipeline.from_pretrained(tiny_sd)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = pipeline.encode_prompt(PROMPTS, guidance=False)["prompt_embeds"]
    with torch.no_grad():
        without = plain.unet(latents, 500, encoder_hidden_states=embeds).sample
        plain.load_lora_weights(tmp_path / "lora")
        loaded = plain.unet(latents, 500, encoder_hidden_states=embeds).sample
        ours = pipeline.unet(latents, 500, encoder_hidden_states=embeds).sample
    assert (loaded - without).abs().max() > 1e-2  # the LoRA changes the output ...
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=1e-5)  # ... exactly as in the trained policy

    # an export reloads as a policy (base model + that LoRA) to continue training from
    reloaded = load(tmp_path / "lora")
    for (name, a), b in zip(pipeline.policy_state_dict().items(), reloaded.policy_state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert reloaded.trainable_parameters()


def test_trl_style_default_pipeline(tiny_sd: Path) -> None:
    pipeline = DefaultDDPOStableDiffusionPipeline(str(tiny_sd), use_lora=True)
    assert pipeline.use_lora and pipeline.get_trainable_layers() is pipeline.unet
    pipeline.scheduler.set_timesteps(STEPS)
    step = pipeline.scheduler_step(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 4, 8, 8), generator=torch.Generator())
    assert step.latents.shape == (1, 4, 8, 8) and step.log_probs.shape == (1,)


def test_not_a_stable_diffusion_pipeline_is_refused() -> None:
    with pytest.raises(TypeError, match="sd_pipeline"):
        DDPOStableDiffusionPipeline(object())


def tiny_sdxl() -> StableDiffusionXLPipeline:
    """A random SDXL pipeline (two text encoders, pooled + size micro-conditioning), 32 px."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)

    def text_config(**extra) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TEXT_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
        )

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, use_linear_projection=True,
    )
    vae = AutoencoderKL(
        sample_size=32, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config()), text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=32)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )


def test_sdxl_records_replays_and_exports(tmp_path: Path) -> None:
    pipeline = DDPOStableDiffusionPipeline(tiny_sdxl())
    pipeline.set_progress_bar_config(disable=True)
    perturb_lora(pipeline)
    output = sample(pipeline, height=32, width=48)
    assert output.images.shape == (2, 3, 32, 48)
    assert {"pooled_prompt_embeds", "negative_pooled_prompt_embeds", "add_time_ids"} <= set(output.conditioning)
    assert output.conditioning["add_time_ids"][0].tolist() == [32, 48, 0, 0, 32, 48]
    latents = torch.stack(output.latents, dim=1)
    conditioning = {k: v.repeat_interleave(STEPS, dim=0) for k, v in output.conditioning.items()}
    flat = latents[:, :-1].reshape(2 * STEPS, 4, 8, 12)
    with torch.no_grad():
        prediction = pipeline.predict(flat, output.timesteps.repeat(2), conditioning, 5.0)
    _, replayed = ddim_step_with_logprob(
        pipeline.scheduler, prediction, output.timesteps.repeat(2), flat, prev_sample=latents[:, 1:].reshape(2 * STEPS, 4, 8, 12)
    )
    torch.testing.assert_close(replayed.view(2, STEPS), torch.stack(output.log_probs, dim=1), rtol=0, atol=1e-5)
    pipeline.save_pretrained(tmp_path / "lora")
    plain = tiny_sdxl()
    plain.load_lora_weights(tmp_path / "lora")
    assert any("lora" in name for name, _ in plain.unet.named_parameters())
