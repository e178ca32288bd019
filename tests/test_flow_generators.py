"""The flow-matching generator adapters (SD3, FLUX.1) against the plain diffusers pipelines they wrap, and the
`GeneratorAdapter` contract a trainer relies on, checked on every family (SD through `DDPOStableDiffusionPipeline`).

Every sampling loop here goes through the interface only (set_timesteps, initial_latents, encode_prompt, predict,
step, decode), the way a trainer drives any family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)

from rlhf.generators import FluxAdapter, GeneratorAdapter, SD3Adapter, generator_class, load_generator
from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline
from rlhf.testing import build_tiny_flux, build_tiny_sd, build_tiny_sd3
from tests.test_pipeline import perturb_lora

PROMPTS = ["a red circle", "a blue square"]
NEGATIVES = ["a green triangle", "a photo of a dog"]
SIZE = 32
STEPS = 3


@dataclass(frozen=True)
class Family:
    """How one family is sampled in these tests, and the plain diffusers pipeline it must agree with."""

    name: str
    guidance_scale: float
    negatives: list[str] | None
    noise_level: float  # a stochastic step (DDIM's eta for SD)
    pipeline_class: type

    def reference(self, path: Path) -> Any:
        pipeline = self.pipeline_class.from_pretrained(path)
        if self.pipeline_class is StableDiffusionPipeline:  # the SD adapter samples with DDIM
            pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


FAMILIES = {
    "sd3": Family("sd3", 4.5, NEGATIVES, 0.7, StableDiffusion3Pipeline),
    "sd3_no_cfg": Family("sd3", 1.0, None, 0.7, StableDiffusion3Pipeline),
    "flux": Family("flux", 3.5, None, 0.7, FluxPipeline),
    "sd": Family("sd", 5.0, NEGATIVES, 1.0, StableDiffusionPipeline),
}


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny models are latency-bound; extra threads only contend on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_generators")
    return {
        "sd3": build_tiny_sd3(root / "sd3"),
        "flux": build_tiny_flux(root / "flux"),
        "sd": build_tiny_sd(root / "sd"),
    }


def load(path: Path, **options: Any) -> GeneratorAdapter:
    adapter = load_generator(path, **options)
    adapter.set_progress_bar_config(disable=True)
    return adapter


@dataclass
class Trajectory:
    latents: list[torch.Tensor]  # initial noise, then every step's output
    log_probs: list[torch.Tensor]
    timesteps: torch.Tensor
    conditioning: dict[str, torch.Tensor]


@torch.no_grad()
def run_loop(
    adapter: GeneratorAdapter,
    family: Family,
    noise: torch.Tensor,
    *,
    noise_level: float = 0.0,
    seed: int | None = None,
) -> Trajectory:
    """The plain sampling loop of the interface, as a trainer writes it."""
    conditioning = adapter.encode_prompt(
        PROMPTS, family.negatives, guidance=family.guidance_scale > 1, height=SIZE, width=SIZE
    )
    timesteps = adapter.set_timesteps(STEPS, SIZE, SIZE)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    latents, log_probs = [noise], []
    for timestep in timesteps:
        output = adapter.predict(latents[-1], timestep, conditioning, family.guidance_scale)
        sample, log_prob, _, _ = adapter.step(
            output, timestep, latents[-1], noise_level=noise_level, generator=generator
        )
        latents.append(sample)
        log_probs.append(log_prob)
    return Trajectory(latents, log_probs, timesteps.clone(), conditioning)


@torch.no_grad()
def assert_steps_replay_exactly(adapter: GeneratorAdapter, family: Family, drawn: Trajectory) -> None:
    """Each drawn step re-scored with its `prev_sample` as it was drawn: log-probs equal, the PPO ratio exactly 1."""
    for index, timestep in enumerate(drawn.timesteps):
        output = adapter.predict(drawn.latents[index], timestep, drawn.conditioning, family.guidance_scale)
        _, log_prob, _, _ = adapter.step(
            output, timestep, drawn.latents[index], noise_level=family.noise_level, prev_sample=drawn.latents[index + 1]
        )
        assert log_prob.dtype == torch.float32 and torch.equal(log_prob, drawn.log_probs[index])


def initial_noise(adapter: GeneratorAdapter, seed: int = 0) -> torch.Tensor:
    return adapter.initial_latents(len(PROMPTS), SIZE, SIZE, torch.Generator().manual_seed(seed))


def reference_images(pipeline: Any, family: Family, noise: torch.Tensor) -> torch.Tensor:
    """The plain diffusers pipeline's own images from the same initial latents."""
    options: dict[str, Any] = {"num_inference_steps": STEPS, "guidance_scale": family.guidance_scale}
    if family.negatives is not None:
        options["negative_prompt"] = family.negatives
    if family.name == "sd":
        options["eta"] = 0.0
    return pipeline(
        PROMPTS, height=SIZE, width=SIZE, latents=noise.clone(), output_type="pt", **options
    ).images


# ---- the contract, on every family ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(FAMILIES))
def test_noise_free_loop_reproduces_the_diffusers_pipeline(tiny_paths: dict[str, Path], key: str) -> None:
    family = FAMILIES[key]
    adapter = load(tiny_paths[family.name])
    noise = initial_noise(adapter)
    trajectory = run_loop(adapter, family, noise)
    images = adapter.decode(trajectory.latents[-1])
    expected = reference_images(family.reference(tiny_paths[family.name]), family, noise)
    assert images.shape == (len(PROMPTS), 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.std() > 1e-3  # not a constant image that any loop would match
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert all(torch.equal(lp, torch.zeros(len(PROMPTS))) for lp in trajectory.log_probs)


@pytest.mark.parametrize("key", ["sd3", "flux", "sd"])
def test_a_drawn_trajectory_replays_with_ratio_exactly_one(tiny_paths: dict[str, Path], key: str) -> None:
    family = FAMILIES[key]
    adapter = load(tiny_paths[family.name])
    noise = initial_noise(adapter)
    drawn = run_loop(adapter, family, noise, noise_level=family.noise_level, seed=1)
    again = run_loop(adapter, family, noise, noise_level=family.noise_level, seed=1)
    deterministic = run_loop(adapter, family, noise)
    assert all(torch.equal(a, b) for a, b in zip(drawn.latents, again.latents))  # every draw from the generator
    assert not torch.allclose(drawn.latents[-1], deterministic.latents[-1], atol=1e-3)  # the steps were stochastic
    recorded = torch.cat(drawn.log_probs)
    assert torch.isfinite(recorded).all() and (recorded != 0).all()
    assert_steps_replay_exactly(adapter, family, drawn)
    # the replay batched over all steps as a trainer does it (one timestep per sample): other batch shapes round
    # differently inside the denoiser, so equal to float32 precision
    rows = len(PROMPTS)
    samples = torch.cat(drawn.latents[:-1])
    nexts = torch.cat(drawn.latents[1:])
    timesteps = drawn.timesteps.repeat_interleave(rows)
    conditioning = {key_: value.repeat(STEPS, *[1] * (value.ndim - 1)) for key_, value in drawn.conditioning.items()}
    with torch.no_grad():
        output = adapter.predict(samples, timesteps, conditioning, family.guidance_scale)
        _, log_probs, _, std = adapter.step(
            output, timesteps, samples, noise_level=family.noise_level, prev_sample=nexts
        )
    ratio = torch.exp(log_probs - recorded)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    assert std.dtype == torch.float32


@pytest.mark.parametrize("key", ["sd3", "flux", "sd"])
def test_reference_policy_is_the_base_model_and_only_lora_trains(tiny_paths: dict[str, Path], key: str) -> None:
    family = FAMILIES[key]
    adapter = load(tiny_paths[family.name])
    noise = initial_noise(adapter)
    base = adapter.decode(run_loop(adapter, family, noise).latents[-1])
    perturb_lora(adapter)
    tuned = adapter.decode(run_loop(adapter, family, noise).latents[-1])
    with adapter.reference_policy():
        reference = adapter.decode(run_loop(adapter, family, noise).latents[-1])
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(reference, base, rtol=0, atol=1e-6)
    # the LoRA is all that trains, in float32, and the loss reaches it through predict
    trainable = adapter.trainable_parameters()
    names = [name for name, p in adapter.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in names)
    assert all(p.dtype == torch.float32 for p in trainable)
    conditioning = adapter.encode_prompt(PROMPTS, family.negatives, guidance=family.guidance_scale > 1,
                                         height=SIZE, width=SIZE)
    timesteps = adapter.set_timesteps(STEPS, SIZE, SIZE)
    adapter.predict(noise, timesteps[0], conditioning, family.guidance_scale).square().mean().backward()
    assert all(p.grad is not None for p in trainable) and any(p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize("key", ["sd3", "flux"])
def test_per_sample_timesteps_equal_one_call_per_timestep(tiny_paths: dict[str, Path], key: str) -> None:
    family = FAMILIES[key]
    adapter = load(tiny_paths[family.name])
    noise = initial_noise(adapter)
    conditioning = adapter.encode_prompt(PROMPTS, family.negatives, height=SIZE, width=SIZE)
    timesteps = adapter.set_timesteps(STEPS, SIZE, SIZE)
    mixed = torch.stack([timesteps[0], timesteps[2]])
    with torch.no_grad():
        together = adapter.predict(noise, mixed, conditioning, family.guidance_scale)
        one = [
            adapter.predict(noise[i : i + 1], mixed[i], {k: v[i : i + 1] for k, v in conditioning.items()},
                            family.guidance_scale)
            for i in range(2)
        ]
    torch.testing.assert_close(together, torch.cat(one), rtol=0, atol=1e-5)
    x0 = adapter.predicted_clean(together, mixed, noise)
    assert x0.shape == noise.shape and x0.dtype == torch.float32


@pytest.mark.parametrize("key", ["sd3", "flux", "sd"])
def test_the_training_objective_agrees_with_the_sampler(tiny_paths: dict[str, Path], key: str) -> None:
    """Diffusion-DPO's objective through the interface: latents noised by `add_noise` with the exact
    `training_target` as the model output give back the clean latents by the sampler's own x0-hat (SD: epsilon;
    flow: the velocity noise - x0 at sigma = t / 1000); training timesteps reproduce from their generator."""
    adapter = load(tiny_paths[FAMILIES[key].name])
    generator = torch.Generator().manual_seed(0)
    clean, noise = (adapter.initial_latents(len(PROMPTS), SIZE, SIZE, generator) for _ in range(2))
    timesteps = adapter.set_timesteps(STEPS, SIZE, SIZE)
    for timestep in (timesteps[0], timesteps[-1]):
        noisy = adapter.add_noise(clean, noise, timestep)
        target = adapter.training_target(clean, noise, timestep)
        recovered = adapter.predicted_clean(target, timestep, noisy)
        torch.testing.assert_close(recovered.float(), clean, rtol=1e-4, atol=1e-4)
    drawn = adapter.training_timesteps(64, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, adapter.training_timesteps(64, torch.Generator().manual_seed(1)))
    train_steps = adapter.scheduler.config.num_train_timesteps
    assert drawn.shape == (64,) and 0 <= float(drawn.min()) and float(drawn.max()) <= train_steps
    assert len(drawn.unique()) > 32  # spread over the schedule, not one value


def test_images_encode_to_the_denoisers_layout(tiny_paths: dict[str, Path]) -> None:
    """`encode_images` gives latents of `latent_shape` (FLUX packed), the VAE's shift and scale applied: decoding
    them back undoes exactly that, so an image's round trip is the VAE's own (encode's mode, then decode)."""
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for key in ("sd3", "flux", "sd"):
        adapter = load(tiny_paths[key])
        latents = adapter.encode_images(pixels)
        assert latents.shape == adapter.latent_shape(2, SIZE, SIZE) and latents.dtype == torch.float32
        vae = adapter.vae
        with torch.no_grad():
            direct = (vae.decode(vae.encode(pixels).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1)
            torch.testing.assert_close(adapter.decode(latents), direct, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", ["sd3", "flux"])
def test_bf16_model_keeps_a_float32_lora_and_replays_exactly(tiny_paths: dict[str, Path], key: str) -> None:
    """Frozen weights in bf16, the LoRA in float32 (Adam's small updates survive), steps scored in float32."""
    family = FAMILIES[key]
    adapter = load(tiny_paths[family.name], torch_dtype=torch.bfloat16)
    assert adapter.denoiser.dtype == adapter.vae.dtype == torch.bfloat16
    assert {p.dtype for p in adapter.trainable_parameters()} == {torch.float32}
    drawn = run_loop(adapter, family, initial_noise(adapter), noise_level=family.noise_level, seed=2)
    assert_steps_replay_exactly(adapter, family, drawn)
    images = adapter.decode(drawn.latents[-1])
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    half = load(tiny_paths[family.name], torch_dtype=torch.float16)
    assert half.denoiser.dtype == torch.float16 and half.vae.dtype == torch.float32  # force_upcast: no fp16 NaNs


# ---- LoRA export: what a plain diffusers pipeline reads ------------------------------------------------------


@pytest.mark.parametrize("key", ["sd3", "flux"])
def test_saved_lora_loads_into_the_plain_pipeline_and_back(
    tiny_paths: dict[str, Path], tmp_path: Path, key: str
) -> None:
    family = FAMILIES[key]
    path = tiny_paths[family.name]
    # alpha != rank: diffusers must read the scale from the saved adapter metadata
    adapter = load(path, lora_rank=4, lora_alpha=8.0)
    perturb_lora(adapter)
    noise = initial_noise(adapter)
    ours = adapter.decode(run_loop(adapter, family, noise).latents[-1])
    adapter.save_pretrained(tmp_path / "policy")

    plain = family.reference(path)
    base = reference_images(plain, family, noise)
    plain.load_lora_weights(tmp_path / "policy")
    with_lora = reference_images(plain, family, noise)
    assert (with_lora - base).abs().max() > 1e-3  # the plain pipeline's output changes...
    torch.testing.assert_close(with_lora, ours, rtol=0, atol=1e-5)  # ...to ours

    assert generator_class(tmp_path / "policy") is type(adapter)
    reloaded = load(tmp_path / "policy")
    assert reloaded.use_lora and reloaded.base_model == str(path)
    expected_state, state = adapter.policy_state_dict(), reloaded.policy_state_dict()
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[name], expected_state[name]) for name in state)
    torch.testing.assert_close(reloaded.decode(run_loop(reloaded, family, noise).latents[-1]), ours, rtol=0, atol=1e-6)
    # training continues from the loaded LoRA
    assert reloaded.trainable_parameters() and all(p.requires_grad for p in reloaded.trainable_parameters())


def test_policy_state_dict_round_trip_and_mismatch_is_named(tiny_paths: dict[str, Path]) -> None:
    adapter, other = load(tiny_paths["sd3"]), load(tiny_paths["sd3"])
    # the LoRA's random init comes from lora_seed alone
    same, reseeded = adapter.policy_state_dict(), load(tiny_paths["sd3"], lora_seed=1).policy_state_dict()
    assert all(torch.equal(same[k], v) for k, v in other.policy_state_dict().items())
    assert any(not torch.equal(same[k], v) for k, v in reseeded.items())
    perturb_lora(adapter)
    other.load_policy_state_dict(adapter.policy_state_dict())
    assert all(torch.equal(a, b) for a, b in zip(adapter.trainable_parameters(), other.trainable_parameters()))
    state = adapter.policy_state_dict()
    state["not_a_lora.weight"] = state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="LoRA state dict"):
        other.load_policy_state_dict(state)


# ---- family specifics ----------------------------------------------------------------------------------------


def test_sd3_without_t5_matches_diffusers_without_t5(tiny_paths: dict[str, Path]) -> None:
    family = FAMILIES["sd3"]
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None}
    adapter = load(tiny_paths["sd3"], pipeline_options=no_t5)
    assert adapter.pipeline.text_encoder_3 is None
    noise = initial_noise(adapter)
    images = adapter.decode(run_loop(adapter, family, noise).latents[-1])
    plain = StableDiffusion3Pipeline.from_pretrained(tiny_paths["sd3"], **no_t5)
    plain.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images, reference_images(plain, family, noise), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sde_type", ["flow_sde", "dance", "cps"])
def test_sde_type_selects_the_step(tiny_paths: dict[str, Path], sde_type: str) -> None:
    from rlhf.generators.flow import SDE_STEPS

    adapter = load(tiny_paths["sd3"], sde_type=sde_type)
    assert adapter.step_function is SDE_STEPS[sde_type]
    adapter.set_timesteps(STEPS, SIZE, SIZE)
    t = adapter.scheduler.timesteps[1]
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
    got = adapter.step(output, t, sample, noise_level=0.5, generator=torch.Generator().manual_seed(3))
    expected = SDE_STEPS[sde_type](adapter.scheduler, output, t, sample, noise_level=0.5,
                                   generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_schedules_follow_the_pipelines_resolution_shift(tiny_paths: dict[str, Path]) -> None:
    """FLUX shifts by the image token count; SD3 does too when its scheduler has dynamic shifting."""
    flux = load(tiny_paths["flux"])
    small, large = flux.set_timesteps(STEPS, 32, 32).clone(), flux.set_timesteps(STEPS, 64, 64).clone()
    assert not torch.allclose(small, large)  # more tokens, larger shift
    plain = FAMILIES["flux"].reference(tiny_paths["flux"])
    plain(PROMPTS[:1], height=64, width=64, num_inference_steps=STEPS, output_type="latent")
    torch.testing.assert_close(plain.scheduler.timesteps, large, rtol=0, atol=0)

    sd3 = load(tiny_paths["sd3"])
    sd3.pipeline.scheduler = type(sd3.scheduler).from_config(sd3.scheduler.config, use_dynamic_shifting=True)
    plain = FAMILIES["sd3"].reference(tiny_paths["sd3"])
    plain.scheduler = type(plain.scheduler).from_config(plain.scheduler.config, use_dynamic_shifting=True)
    for size in (32, 64):
        plain(PROMPTS[:1], height=size, width=size, num_inference_steps=STEPS, output_type="latent")
        torch.testing.assert_close(sd3.set_timesteps(STEPS, size, size), plain.scheduler.timesteps, rtol=0, atol=0)


def test_flux_noise_from_a_generator_is_the_pipelines(tiny_paths: dict[str, Path]) -> None:
    """Drawn unpacked and packed, as FluxPipeline draws it: the same seed gives the plain pipeline's image."""
    family = FAMILIES["flux"]
    adapter = load(tiny_paths["flux"])
    images = adapter.decode(run_loop(adapter, family, initial_noise(adapter, seed=5)).latents[-1])
    plain = family.reference(tiny_paths["flux"])
    expected = plain(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=family.guidance_scale,
                     generator=torch.Generator().manual_seed(5), output_type="pt").images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    # the guidance embedding is read: another scale, another image
    unguided = dataclasses.replace(family, guidance_scale=1.0)
    other = adapter.decode(run_loop(adapter, unguided, initial_noise(adapter, seed=5)).latents[-1])
    assert (other - images).abs().max() > 1e-4


def test_flux_without_guidance_embedding_matches_diffusers(tiny_paths: dict[str, Path]) -> None:
    """FLUX.1-schnell's layout: no guidance embedding, so the scale is not passed (and changes nothing)."""
    pipeline = FluxPipeline.from_pretrained(tiny_paths["flux"])
    pipeline.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    pipeline.transformer = FluxTransformer2DModel.from_config(pipeline.transformer.config, guidance_embeds=False)
    adapter = FluxAdapter(pipeline)
    family = FAMILIES["flux"]
    noise = initial_noise(adapter)
    images = adapter.decode(run_loop(adapter, family, noise).latents[-1])
    unguided = adapter.decode(run_loop(adapter, dataclasses.replace(family, guidance_scale=1.0), noise).latents[-1])
    torch.testing.assert_close(images, unguided, rtol=0, atol=0)
    # the adapter's LoRA starts as a no-op, so the wrapped pipeline's own call is the base model's
    torch.testing.assert_close(images, reference_images(pipeline, family, noise), rtol=0, atol=1e-5)


def test_flux_cfg_arguments_are_ignored(tiny_paths: dict[str, Path]) -> None:
    adapter = load(tiny_paths["flux"])
    plain = adapter.encode_prompt(PROMPTS, height=SIZE, width=SIZE)
    guided = adapter.encode_prompt(PROMPTS, NEGATIVES, guidance=True, height=SIZE, width=SIZE)
    assert set(plain) == set(guided) == {"prompt_embeds", "pooled_prompt_embeds", "img_ids"}
    assert all(torch.equal(plain[k], guided[k]) for k in plain)
    assert plain["img_ids"].shape == (len(PROMPTS), 16, 3)


# ---- bad inputs are named ------------------------------------------------------------------------------------


def test_bad_inputs_name_the_field(tiny_paths: dict[str, Path]) -> None:
    sd3, flux = load(tiny_paths["sd3"]), load(tiny_paths["flux"])
    for adapter in (sd3, flux):
        with pytest.raises(ValueError, match="height/width"):
            adapter.latent_shape(1, 30, 32)
        with pytest.raises(ValueError, match="height/width"):
            adapter.set_timesteps(STEPS, 32, 36)
        with pytest.raises(ValueError, match="prompts"):
            adapter.encode_prompt("a red circle")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="num_inference_steps"):
            adapter.set_timesteps(0, SIZE, SIZE)
    with pytest.raises(ValueError, match="height/width: at most 64 px"):
        sd3.latent_shape(1, 128, 128)  # beyond the positional embedding's grid
    with pytest.raises(ValueError, match="negative_prompts"):
        sd3.encode_prompt(PROMPTS, NEGATIVES[:1])
    conditioning = flux.encode_prompt(PROMPTS, height=64, width=64)
    with pytest.raises(ValueError, match="height/width"):
        flux.predict(initial_noise(flux), 1000.0, conditioning, 3.5)  # conditioning for another size
    with pytest.raises(ValueError, match="timesteps"):
        sd3.predict(initial_noise(sd3), torch.ones(3), sd3.encode_prompt(PROMPTS, guidance=False), 1.0)
    with pytest.raises(ValueError, match="height/width"):
        flux.decode(torch.zeros(1, 8, 64))  # 8 tokens: not square, size needed
    with pytest.raises(ValueError, match="sde_type"):
        SD3Adapter(sd3.pipeline, sde_type="ode")
    with pytest.raises(TypeError, match="pipeline"):
        FluxAdapter(sd3.pipeline)
    with pytest.raises(ValueError, match="pretrained_model_name"):
        generator_class(tiny_paths["sd"] / "unet")  # a model, not a pipeline
    assert generator_class(tiny_paths["sd"]) is DDPOStableDiffusionPipeline
