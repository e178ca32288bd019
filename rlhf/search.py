"""Inference-time scaling guided by a reward: best-of-N, zero-order noise search and Feynman-Kac steering.

Every method takes any reward function `reward_fn(images, prompts, metadata) -> (rewards, info)` (weighted
multi-perspective rewards included) and any generator behind `GeneratorAdapter` (SD, SDXL, SD3, FLUX), and reports what it spent: denoiser
evaluations (NFEs; one guided UNet call on a batch of k latents counts k x 2 with classifier-free guidance)
and images scored (reward calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from rlhf.generators.base import GeneratorAdapter
from rlhf.generators.sampling import sample_trajectories

RewardFn = Callable[..., tuple[torch.Tensor, dict]]
POTENTIALS = ("max", "difference", "sum")
RESAMPLING = ("multinomial", "ess", "none")


@dataclass
class SearchResult:
    """What a search returns for one prompt.

    image: the chosen image, float [3, H, W] in [0, 1].
    reward: its reward; index: its position among the candidates.
    candidates: every final candidate's image [N, 3, H, W], in the order they were made.
    candidate_rewards: every final candidate's reward [N]; the first is the baseline (plain sampling's draw).
    nfe: denoiser evaluations spent; reward_calls: images scored.
    history: per round or resampling step, what the method saw (rewards, ESS, accepted moves).
    """

    image: torch.Tensor
    reward: float
    index: int
    candidates: torch.Tensor
    candidate_rewards: torch.Tensor
    nfe: int
    reward_calls: int
    history: list[dict] = field(default_factory=list)


@dataclass
class _Sampler:
    """The pieces of a denoising run shared by the search methods."""

    pipeline: GeneratorAdapter
    prompt: str
    num_inference_steps: int
    guidance_scale: float
    eta: float
    height: int
    width: int

    @property
    def evaluations_per_latent_step(self) -> int:
        return 2 if self.guidance_scale > 1.0 else 1

    def conditioning(self, batch_size: int) -> dict[str, torch.Tensor]:
        return self.pipeline.encode_prompt([self.prompt] * batch_size, guidance=self.guidance_scale > 1.0,
                                           height=self.height, width=self.width)

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        shape = self.pipeline.latent_shape(batch_size, self.height, self.width)
        return randn_tensor(shape, generator=generator, device=self.pipeline.device, dtype=torch.float32)

    def step(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, torch.Tensor],
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One denoising step: (next latents, the predicted clean latents x0-hat)."""
        prediction = self.pipeline.predict(latents, timestep, conditioning, self.guidance_scale)
        # x0-hat is read off the prediction: it costs no randomness and no extra denoiser call
        clean = self.pipeline.predicted_clean(prediction, timestep, latents)
        next_latents = self.pipeline.step(prediction, timestep, latents, noise_level=self.eta, generator=generator)[0]
        return next_latents, clean

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Denoise a batch of initial noises to images [B, 3, H, W] (the trainers' sampling loop)."""
        return sample_trajectories(
            self.pipeline, None, num_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            noise_level=self.eta, height=self.height, width=self.width, generator=generator,
            conditioning=self.conditioning(len(noise)), initial_latents=noise * self.pipeline.init_noise_sigma,
        ).images


def _rewards(reward_fn: RewardFn, images: torch.Tensor, prompt: str) -> torch.Tensor:
    rewards, _ = reward_fn(images, [prompt] * len(images), [{} for _ in range(len(images))])
    rewards = torch.as_tensor(rewards, dtype=torch.float32).detach().cpu()
    # a failed score (NaN) must never be chosen, but it must not stop the search either
    return torch.nan_to_num(rewards, nan=-math.inf)


def _sampler(pipeline, prompt, num_inference_steps, guidance_scale, eta, height, width) -> _Sampler:
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: expected >= 1, got {num_inference_steps}")
    if eta < 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    size = pipeline.default_size
    return _Sampler(pipeline, prompt, num_inference_steps, guidance_scale, eta, height or size, width or size)


def best_of_n(pipeline: GeneratorAdapter, prompt: str, reward_fn: RewardFn, n: int = 8, *,
              num_inference_steps: int = 20, guidance_scale: float = 5.0, eta: float = 0.0, seed: int = 0,
              height: int | None = None, width: int | None = None, batch_size: int = 16) -> SearchResult:
    """Random search: N initial noises from `seed`, the reward picks. The first candidate is what plain
    sampling with `seed` draws, so best-of-1 is plain sampling. NFE = N x steps (x 2 with guidance)."""
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    sampler = _sampler(pipeline, prompt, num_inference_steps, guidance_scale, eta, height, width)
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    noise = sampler.initial_noise(n, generator)
    images = torch.cat([sampler.sample(noise[i: i + batch_size], generator) for i in range(0, n, batch_size)])
    rewards = _rewards(reward_fn, images, prompt)
    best = int(rewards.argmax())
    return SearchResult(images[best], float(rewards[best]), best, images, rewards,
                        nfe=n * num_inference_steps * sampler.evaluations_per_latent_step, reward_calls=n)


def sphere_neighbours(pivot: torch.Tensor, n: int, cosine: float, generator: torch.Generator) -> torch.Tensor:
    """N points with the pivot's norm at the given cosine similarity to it (random directions around it)."""
    flat = pivot.reshape(1, -1)
    directions = torch.randn((n, flat.shape[1]), generator=generator, device=pivot.device, dtype=pivot.dtype)
    unit_pivot = flat / flat.norm()
    directions = directions - (directions @ unit_pivot.T) * unit_pivot  # orthogonal to the pivot
    directions = directions / directions.norm(dim=1, keepdim=True)
    neighbours = cosine * flat + math.sqrt(1 - cosine**2) * flat.norm() * directions
    return neighbours.reshape(n, *pivot.shape[1:])


def zero_order_search(pipeline: GeneratorAdapter, prompt: str, reward_fn: RewardFn,
                      n_neighbours: int = 4, rounds: int = 3, cosine: float = 0.9, *,
                      num_inference_steps: int = 20, guidance_scale: float = 5.0, eta: float = 0.0, seed: int = 0,
                      height: int | None = None, width: int | None = None) -> SearchResult:
    """Zero-order search over the initial noise (Ma et al. 2025): from a pivot, score N neighbours on the sphere
    around it (same norm, cosine `cosine` to the pivot), move to the best if it beats the pivot, else stay; K rounds.
    The result is never worse than the starting pivot. NFE = (1 + K x N) x steps (x 2 with guidance)."""
    if n_neighbours < 1 or rounds < 0:
        raise ValueError(f"n_neighbours >= 1 and rounds >= 0 expected, got {n_neighbours} and {rounds}")
    if not -1.0 < cosine < 1.0:
        raise ValueError(f"cosine: expected a value in (-1, 1), got {cosine}")
    sampler = _sampler(pipeline, prompt, num_inference_steps, guidance_scale, eta, height, width)
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    pivot = sampler.initial_noise(1, generator)
    # with eta > 0 each candidate replays the same per-step noise, so only the initial noise is searched
    step_seed = seed + 1

    def run(noise: torch.Tensor) -> torch.Tensor:
        return sampler.sample(noise, torch.Generator(pipeline.device).manual_seed(step_seed) if eta else None)

    pivot_image = run(pivot)
    pivot_reward = _rewards(reward_fn, pivot_image, prompt)[0]
    candidates, candidate_rewards, history, pivot_index = [pivot_image], [pivot_reward.reshape(1)], [], 0
    for round_index in range(rounds):
        neighbours = sphere_neighbours(pivot, n_neighbours, cosine, generator)
        # deterministic sampling (eta = 0) batches the neighbours; otherwise each replays the pivot's step noise
        images = run(neighbours) if eta == 0 else torch.cat([run(neighbours[i: i + 1]) for i in range(n_neighbours)])
        rewards = _rewards(reward_fn, images, prompt)
        best = int(rewards.argmax())
        accepted = bool(rewards[best] > pivot_reward)
        if accepted:
            pivot, pivot_image, pivot_reward = neighbours[best: best + 1], images[best: best + 1], rewards[best]
            pivot_index = 1 + round_index * n_neighbours + best
        candidates.append(images)
        candidate_rewards.append(rewards)
        history.append({"round": round_index, "best_neighbour": float(rewards[best]), "accepted": accepted,
                        "pivot_reward": float(pivot_reward)})
    calls = 1 + rounds * n_neighbours
    return SearchResult(pivot_image[0], float(pivot_reward), pivot_index, torch.cat(candidates), torch.cat(candidate_rewards),
                        nfe=calls * num_inference_steps * sampler.evaluations_per_latent_step, reward_calls=calls,
                        history=history)


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """ESS = 1 / sum(w^2) of the normalised weights: k when uniform, 1 when one particle holds all the mass."""
    weights = torch.softmax(log_weights, dim=0)
    return float(1.0 / (weights**2).sum())


def fk_steering(pipeline: GeneratorAdapter, prompt: str, reward_fn: RewardFn, particles: int = 4, *,
                lam: float = 10.0, potential: str = "max", resampling: str = "multinomial",
                ess_threshold: float = 0.5, resample_every: int = 5, num_inference_steps: int = 20,
                guidance_scale: float = 5.0, eta: float = 1.0, seed: int = 0, height: int | None = None,
                width: int | None = None) -> SearchResult:
    """Feynman-Kac steering (Singhal et al. 2025): k particles denoised together; every `resample_every` steps
    each particle's predicted clean image (x0-hat, decoded) is scored, weighted by a potential, and the particles
    are resampled; at the end the accumulated potentials are divided out (the target is p(x) exp(lam r(x))).

    Potentials, with r_t the reward of x0-hat at a resampling step: "max" exp(lam max_{s>=t} r_s),
    "difference" exp(lam (r_t - r_previous)), "sum" exp(lam sum_{s>=t} r_s). Resampling: "multinomial" at every
    resampling step, "ess" only when the effective sample size falls below `ess_threshold` x k, "none" never.
    With lam = 0 and resampling "none" the particles are exactly plain sampling's draws with `seed`.
    NFE = k x steps (x 2 with guidance); reward calls = k x (resampling steps + 1).
    """
    if potential not in POTENTIALS:
        raise ValueError(f"potential: expected one of {POTENTIALS}, got {potential!r}")
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling: expected one of {RESAMPLING}, got {resampling!r}")
    if particles < 1 or resample_every < 1:
        raise ValueError(f"particles and resample_every: expected >= 1, got {particles} and {resample_every}")
    if eta <= 0:
        raise ValueError(f"eta: FK steering resamples stochastic transitions, expected eta > 0, got {eta}")
    sampler = _sampler(pipeline, prompt, num_inference_steps, guidance_scale, eta, height, width)
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    latents = sampler.initial_noise(particles, generator)
    conditioning = sampler.conditioning(particles)
    timesteps = pipeline.set_timesteps(num_inference_steps, sampler.height, sampler.width)
    latents = latents * pipeline.init_noise_sigma
    log_weights = torch.zeros(particles)  # importance weights since the last resampling
    log_potentials = torch.zeros(particles)  # log of the product of potentials applied along each lineage
    previous: torch.Tensor | None = None  # the previous step's r (difference), running max, or running sum
    reward_calls, history = 0, []
    with torch.no_grad():
        for index, timestep in enumerate(timesteps):
            latents, x0_hat = sampler.step(latents, timestep, conditioning, generator)
            last = index == num_inference_steps - 1
            if last or (index + 1) % resample_every:
                continue
            rewards = _rewards(reward_fn, pipeline.decode(x0_hat), prompt)
            reward_calls += particles
            if potential == "max":
                current = rewards if previous is None else torch.maximum(previous, rewards)
                log_g = lam * current
            elif potential == "sum":
                current = rewards if previous is None else previous + rewards
                log_g = lam * current
            else:
                current = rewards
                log_g = lam * (rewards if previous is None else rewards - previous)
            # a particle whose score failed gets no weight, unless every particle failed
            log_g = torch.where(torch.isfinite(log_g), log_g, torch.full_like(log_g, -1e9))
            log_weights, log_potentials = log_weights + log_g, log_potentials + log_g
            ess = effective_sample_size(log_weights)
            resample = resampling == "multinomial" or (resampling == "ess" and ess < ess_threshold * particles)
            if resample:
                choice = torch.multinomial(torch.softmax(log_weights, 0), particles, replacement=True,
                                           generator=torch.Generator().manual_seed(seed * 1000 + index))
                latents, log_potentials, current = latents[choice], log_potentials[choice], current[choice]
                log_weights = torch.zeros(particles)
            previous = current
            history.append({"step": index, "rewards": rewards.tolist(), "ess": ess, "resampled": resample})
        images = pipeline.decode(latents)
    final = _rewards(reward_fn, images, prompt)
    reward_calls += particles
    # the final correction, exp(lam r_0) over the potentials already applied along each lineage, gives each
    # particle's weight under the target p(x) exp(lam r(x)); the chosen image is the best-rewarded particle
    target_log_weights = log_weights + lam * torch.nan_to_num(final, neginf=-1e9) - log_potentials
    history.append({"step": num_inference_steps - 1, "rewards": final.tolist(),
                    "target_log_weights": target_log_weights.tolist()})
    best = int(final.argmax())
    return SearchResult(images[best], float(final[best]), best, images, final,
                        nfe=particles * num_inference_steps * sampler.evaluations_per_latent_step,
                        reward_calls=reward_calls, history=history)


# ------------------------------------------------------------------------------------------- `rlhf search`

METHODS = ("best_of_n", "zero_order", "fk_steering")


@dataclass
class SearchConfig:
    """Arguments of `rlhf search`: N = `n`, K = `rounds`, k = `particles` in the methods' papers."""

    pretrained_model: str = field(default="", metadata={"help": "Required: a diffusers pipeline (SD, SDXL, SD3, FLUX) "
                                                                "path or cached hub id, a saved LoRA policy directory, "
                                                                "or a generator name the `rlhf` command resolves "
                                                                "(toy, toy-flow)."})
    prompts: list[str] = field(default_factory=list, metadata={"help": "The prompts (or prompts_file)."})
    prompts_file: str = field(default="", metadata={"help": "A file with one prompt per line."})
    method: str = field(default="best_of_n", metadata={"help": "best_of_n | zero_order | fk_steering."})
    n: int = field(default=8, metadata={"help": "Best-of-N candidates, or zero-order neighbours per round."})
    rounds: int = field(default=3, metadata={"help": "Zero-order rounds."})
    cosine: float = field(default=0.9, metadata={"help": "Zero-order neighbours' cosine to the pivot noise."})
    particles: int = field(default=4, metadata={"help": "FK steering particles."})
    lam: float = field(default=10.0, metadata={"help": "FK steering lambda."})
    potential: str = field(default="max", metadata={"help": "FK potential: max | difference | sum."})
    resampling: str = field(default="multinomial", metadata={"help": "FK resampling: multinomial | ess | none."})
    ess_threshold: float = field(default=0.5, metadata={"help": "Fraction of particles under which 'ess' resamples."})
    resample_every: int = field(default=5, metadata={"help": "FK resampling interval in denoising steps."})
    num_inference_steps: int = field(default=20, metadata={"help": "Denoising steps."})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance weight."})
    eta: float = field(default=-1.0, metadata={"help": "The step's noise level (DDIM eta, the flow SDE's noise level); "
                                                       "-1 = 0 for best_of_n/zero_order, 1 for fk_steering."})
    seed: int = field(default=0, metadata={"help": "Prompt i uses seed + i."})
    height: int = field(default=0, metadata={"help": "Image height (0 = the model's size)."})
    width: int = field(default=0, metadata={"help": "Image width (0 = the model's size)."})
    reward: dict = field(default_factory=dict,
                         metadata={"help": "Required: the reward block, {builtin: NAME} | {model: DIR, weighting: ...} "
                                           "| {url: ...}."})
    output_dir: str = field(default="runs/search", metadata={"help": "Where the chosen images, metrics.json and the "
                                                                     "candidate grid go."})
    device: str = field(default="cpu", metadata={"help": "Torch device."})


def run_search(config: SearchConfig, pipeline: GeneratorAdapter, reward_fn: RewardFn, prompt: str,
               seed: int) -> SearchResult:
    """One prompt searched with the method and budget of `config`."""
    common = dict(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                  seed=seed, height=config.height or None, width=config.width or None)
    if config.method == "best_of_n":
        return best_of_n(pipeline, prompt, reward_fn, config.n, eta=max(config.eta, 0.0), **common)
    if config.method == "zero_order":
        return zero_order_search(pipeline, prompt, reward_fn, config.n, config.rounds, config.cosine,
                                 eta=max(config.eta, 0.0), **common)
    return fk_steering(pipeline, prompt, reward_fn, config.particles, lam=config.lam, potential=config.potential,
                       resampling=config.resampling, ess_threshold=config.ess_threshold,
                       resample_every=config.resample_every, eta=1.0 if config.eta < 0 else config.eta, **common)


def _prompts(config: SearchConfig) -> list[str]:
    from pathlib import Path

    prompts = list(config.prompts)
    if config.prompts_file:
        path = Path(config.prompts_file)
        if not path.is_file():
            raise ValueError(f"prompts_file: no such file {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("prompts or prompts_file: give at least one prompt")
    return prompts


def save_candidate_grid(results: list[SearchResult], prompts: list[str], path) -> None:
    """A grid PNG: one row per prompt, its candidates with their rewards, the chosen one framed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(r.candidates) for r in results)
    figure, axes = plt.subplots(len(results), columns, figsize=(1.3 * columns, 1.5 * len(results)), squeeze=False)
    for row, (result, prompt) in enumerate(zip(results, prompts)):
        for column in range(columns):
            axis = axes[row][column]
            axis.axis("off")
            if column < len(result.candidates):
                axis.imshow(result.candidates[column].permute(1, 2, 0).cpu().numpy())
                axis.set_title(f"{float(result.candidate_rewards[column]):.3f}", fontsize=7,
                               color="red" if column == result.index else "black")
        axes[row][0].text(-0.1, 0.5, prompt, fontsize=6, rotation=90, va="center", ha="right",
                          transform=axes[row][0].transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _check(config: SearchConfig) -> None:
    """The fields with no default: the search names no generator or reward of its own."""
    if config.method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {config.method!r}")
    if not config.pretrained_model:
        raise ValueError("pretrained_model: expected a diffusers pipeline path or hub id, or a saved policy directory")
    if not config.reward:
        raise ValueError("reward: expected a reward block ({builtin: NAME} | {model: DIR} | {url: URL})")


def main(argv: list[str], model_path: Callable[[str], str] = str) -> int:
    """`rlhf search --config configs/search/X.yaml [--output_dir DIR] [--field value ...]`.

    model_path: the path or hub id `pretrained_model` stands for: the calling command resolves the generator names
    it defines (the `rlhf` command's); by default a name is a path or hub id itself."""
    import json
    from pathlib import Path

    from PIL import Image
    from tqdm import tqdm

    from rlhf.config import parse_config, save_config
    from rlhf.generators import load_generator
    from rlhf.rewards.reward_fn import build_reward

    (config,) = parse_config(SearchConfig, argv)
    _check(config)
    prompts = _prompts(config)
    reward_fn = build_reward(config.reward)
    pipeline = load_generator(model_path(config.pretrained_model), use_lora=False).to(config.device)
    pipeline.set_progress_bar_config(disable=True)
    output = Path(config.output_dir)
    (output / "images").mkdir(parents=True, exist_ok=True)
    save_config(config, output / "config.yaml")
    results, rows = [], []
    for index, prompt in enumerate(tqdm(prompts, desc=f"search ({config.method})", unit="prompt")):
        result = run_search(config, pipeline, reward_fn, prompt, config.seed + index)
        results.append(result)
        image = (result.image.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        Image.fromarray(image).save(output / "images" / f"{index:03d}.png")
        rows.append({"prompt": prompt, "chosen_reward": result.reward,
                     "baseline_reward": float(result.candidate_rewards[0]), "nfe": result.nfe,
                     "reward_calls": result.reward_calls, "image": f"images/{index:03d}.png"})
    summary = {
        "method": config.method,
        "prompts": rows,
        "mean_chosen_reward": sum(r["chosen_reward"] for r in rows) / len(rows),
        "mean_baseline_reward": sum(r["baseline_reward"] for r in rows) / len(rows),
        "nfe_per_prompt": rows[0]["nfe"],
        "reward_calls_per_prompt": rows[0]["reward_calls"],
    }
    (output / "metrics.json").write_text(json.dumps(summary, indent=2))
    save_candidate_grid(results, prompts, output / "candidates.png")
    print(f"{config.method}: mean chosen reward {summary['mean_chosen_reward']:.4f} "
          f"(baseline {summary['mean_baseline_reward']:.4f}), {summary['nfe_per_prompt']} NFE per prompt; "
          f"wrote {output}")
    return 0
