"""Reward functions for RL trainers: the `reward_fn(images, prompts, metadata) -> (rewards, info)` call of TRL 0.23
and ddpo-pytorch over a reward model (in-process or over HTTP) or a weight-free built-in, folded by a `Weighting`."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import httpx
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from reward.inputs import load_images, pil_to_tensor, validate_float_pixels, validate_prompts
from rlhf import toy
from rlhf.rewards.weighting import Weighting

Images = Any  # float BCHW in [0, 1] or uint8 NHWC, as a torch tensor or numpy array (or a list of images)
Pixels = Callable[[Tensor, list[str]], Tensor]


@runtime_checkable
class RewardFunction(Protocol):
    """What every trainer calls: `rewards, info = reward_fn(images, prompts, metadata)`.

    `images` is a float tensor BCHW in [0, 1] or a uint8 NHWC tensor/array; `rewards` a 1-D float32 tensor, one per
    image (NaN where a sample could not be scored); `info` holds at least `"raw"` and `"normalized"`
    (perspective -> 1-D tensor). `differentiable` says whether `rewards` keep the graph to float pixels that
    require grad; `perspectives` names the raw scores. A function may also carry `weighting` (a `Weighting`):
    when its level is "advantage", trainers take advantages from `weighting.advantages(raw, prompts)`.
    """

    perspectives: list[str]
    differentiable: bool

    def __call__(self, images: Images, prompts: Sequence[str], metadata: Any = None) -> tuple[Tensor, dict]: ...


class Scorer(Protocol):
    """Anything LocalReward can wrap: a `reward.RewardModel`, a built-in, or your own module."""

    perspectives: list[str]

    def score(
        self, images: Any, prompts: Sequence[str], perspectives: Sequence[str] | None = None
    ) -> dict[str, Tensor]: ...


def as_float_images(images: Images) -> Tensor:
    """Images in any accepted form -> a validated float32 BCHW RGB tensor in [0, 1] (graph kept for float input)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if isinstance(images, Tensor) and images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"images: a uint8 batch must be NHWC with 1, 3 or 4 channels, got shape {tuple(images.shape)}"
            )
        images = images.permute(0, 3, 1, 2).float() / 255.0
    if isinstance(images, Tensor):
        if not images.is_floating_point():
            raise TypeError(f"images: expected float (BCHW in [0, 1]) or uint8 (NHWC) pixels, got {images.dtype}")
        return validate_float_pixels(images.float())
    pil_images = load_images(images)
    if len({image.size for image in pil_images}) != 1:
        sizes = sorted({image.size for image in pil_images})
        raise ValueError(f"images: all images of a batch must share one size, got {sizes}")
    return pil_to_tensor(pil_images)


class AsyncReward:
    """Any reward function, callable as usual or submitted to a background thread: `future = r.submit(...)`;
    `rewards, info = future.result()`. One worker keeps calls in order (stateful weighting stays deterministic).
    Do not modify the submitted images until the future is done."""

    def __init__(self, reward_fn: Callable[..., tuple[Tensor, dict]], max_workers: int = 1) -> None:
        self.reward_fn = reward_fn
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")

    @property
    def perspectives(self) -> list[str]:
        return list(getattr(self.reward_fn, "perspectives", []))

    @property
    def differentiable(self) -> bool:
        return bool(getattr(self.reward_fn, "differentiable", False))

    @property
    def weighting(self) -> Weighting | None:
        return getattr(self.reward_fn, "weighting", None)

    def __call__(self, images: Images, prompts: Sequence[str], metadata: Any = None) -> tuple[Tensor, dict]:
        return self.reward_fn(images, prompts, metadata)

    def submit(self, images: Images, prompts: Sequence[str], metadata: Any = None) -> Future:
        """Start scoring in the background; the future's result is `(rewards, info)`."""
        return self._executor.submit(self.reward_fn, images, prompts, metadata)

    def close(self) -> None:
        """Wait for pending calls and stop the worker."""
        self._executor.shutdown(wait=True)


class _WeightedReward:
    """Shared by LocalReward and RemoteReward: raw scores per perspective -> (rewards, info) through `weighting`."""

    perspectives: list[str]
    differentiable: bool = False
    weighting: Weighting
    _async: AsyncReward | None = None

    def scores(self, images: Images, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Raw scores of the perspectives the weighting reads, one 1-D float32 tensor each."""
        raise NotImplementedError

    def __call__(self, images: Images, prompts: Sequence[str], metadata: Any = None) -> tuple[Tensor, dict]:
        prompts = list(prompts)
        raw = self.scores(images, prompts)
        folded = self.weighting(raw, prompts)
        info = {"raw": raw, "normalized": folded.normalized, "violated": folded.violated, "level": self.weighting.level}
        return folded.total, info

    def submit(self, images: Images, prompts: Sequence[str], metadata: Any = None) -> Future:
        """Score in a background thread (overlapping the next sampling batch); the result is `(rewards, info)`."""
        if self._async is None:
            self._async = AsyncReward(self)
        return self._async.submit(images, prompts, metadata)

    def _weighting_for(self, weighting: Weighting | Mapping[str, Any] | None) -> Weighting:
        if isinstance(weighting, Weighting):
            unknown = sorted(set(weighting.perspectives) - set(self.perspectives))
            if unknown:
                raise ValueError(f"weighting: unknown perspective(s) {unknown}; the reward has {self.perspectives}")
            return weighting
        return Weighting.from_config(weighting, self.perspectives)


class LocalReward(_WeightedReward):
    """A scorer in this process (a `reward.RewardModel`, a built-in, or anything with `.perspectives` and
    `.score(images, prompts, perspectives)`), scored in chunks of `batch_size` and folded by `weighting`
    (a `Weighting` or its config; None = every perspective weight 1, no normalisation).

    Images always reach the scorer as float BCHW tensors in [0, 1] (uint8 input is divided by 255), so the
    black-box and differentiable modes, and the reward server, score the same pixels the same way. With
    `differentiable=False` scoring runs under `torch.no_grad()` and rewards come back detached on the CPU;
    with True the graph to the pixels is kept.
    """

    def __init__(
        self,
        model: Scorer,
        weighting: Weighting | Mapping[str, Any] | None = None,
        differentiable: bool = False,
        batch_size: int = 16,
    ) -> None:
        self.batch_size = _int_at_least("batch_size", batch_size, 1)
        if differentiable and getattr(model, "differentiable", True) is False:
            raise ValueError(f"differentiable: {type(model).__name__} has no gradient to the pixels")
        self.model = model
        self.perspectives = list(model.perspectives)
        self.weighting = self._weighting_for(weighting)
        if differentiable and not self.weighting.differentiable:
            raise ValueError("differentiable: the weighting's 'per_prompt' statistics are not differentiable; use "
                             "'batch', 'running' or 'none' normalisation")
        self.differentiable = differentiable

    def scores(self, images: Images, prompts: Sequence[str]) -> dict[str, Tensor]:
        pixels = as_float_images(images)
        prompts = validate_prompts(prompts, pixels.shape[0])
        wanted = self.weighting.perspectives
        chunks: dict[str, list[Tensor]] = {name: [] for name in wanted}
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            for start in range(0, pixels.shape[0], self.batch_size):
                stop = start + self.batch_size
                scored = self.model.score(pixels[start:stop], prompts[start:stop], perspectives=wanted)
                for name in wanted:
                    chunks[name].append(torch.as_tensor(scored[name]).float().reshape(-1))
        raw = {name: torch.cat(parts) for name, parts in chunks.items()}
        return raw if self.differentiable else {name: scores.detach().cpu() for name, scores in raw.items()}


class RemoteRewardError(RuntimeError):
    """The reward server refused a request (4xx) or stayed unreachable after the retries."""


class RemoteReward(_WeightedReward):
    """The same call over HTTP against `rlhf serve`. Images travel as lossless PNG (8 bits per channel: float
    pixels are rounded to k/255), `batch_size` per request. Connection errors, 429 and 5xx are retried `retries`
    times with exponential backoff; other 4xx raise `RemoteRewardError` at once with the server's message.
    The server returns raw scores and this client folds them with `weighting` (None = the server's own weighting
    from /info), so stateful normalisation lives with the trainer and resumes with it.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        weighting: Weighting | Mapping[str, Any] | None = None,
        batch_size: int = 32,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries = _int_at_least("retries", retries, 0)
        self.batch_size = _int_at_least("batch_size", batch_size, 1)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)
        self.server_info = self._request("GET", "/info")
        self.perspectives = list(self.server_info["perspectives"])
        self.weighting = self._weighting_for(weighting if weighting is not None else self.server_info.get("weighting"))

    def scores(self, images: Images, prompts: Sequence[str]) -> dict[str, Tensor]:
        pixels = as_float_images(images)
        prompts = validate_prompts(prompts, pixels.shape[0])
        encoded = encode_png_batch(pixels)
        chunks: dict[str, list[float]] = {name: [] for name in self.weighting.perspectives}
        for start in range(0, len(encoded), self.batch_size):
            stop = start + self.batch_size
            payload = {"images": encoded[start:stop], "prompts": prompts[start:stop]}
            reply = self._request("POST", "/score", json=payload)
            for name in chunks:
                chunks[name].extend(_nan_for_none(reply["scores"][name]))
        return {name: torch.tensor(values, dtype=torch.float32) for name, values in chunks.items()}

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> dict:
        attempt = 0
        while True:
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                retryable, problem = True, f"unreachable ({exc})"
            else:
                if response.status_code < 400:
                    return response.json()
                retryable = response.status_code == 429 or response.status_code >= 500
                problem = f"HTTP {response.status_code}: {_detail(response)}"
            if not retryable or attempt >= self.retries:
                raise RemoteRewardError(f"{method} {self.url}{path}: {problem} (after {attempt + 1} tries)")
            time.sleep(0.25 * 2**attempt)
            attempt += 1


def encode_png_batch(pixels: Tensor) -> list[str]:
    """Float BCHW [0, 1] -> base64 PNG strings (8-bit RGB, rounded)."""
    arrays = (pixels.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    encoded = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def _int_at_least(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _nan_for_none(values: list[float | None]) -> list[float]:
    # JSON has no NaN: the server sends null for a score that is not finite
    return [float("nan") if value is None else float(value) for value in values]


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:500]


# ---------------------------------------------------------------------------------------------- built-ins
class BuiltinScorer:
    """A weight-free scorer: named perspectives, each a function of float BCHW pixels in [0, 1] and prompts."""

    def __init__(self, name: str, functions: Mapping[str, Pixels], differentiable: bool) -> None:
        self.name = name
        self.functions = dict(functions)
        self.perspectives = list(functions)
        self.differentiable = differentiable

    def score(
        self, images: Images, prompts: Sequence[str], perspectives: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        pixels = as_float_images(images)
        prompts = validate_prompts(prompts, pixels.shape[0])
        return {name: self.functions[name](pixels, prompts).float() for name in (perspectives or self.perspectives)}


def jpeg_compressibility(pixels: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
    """Minus the JPEG size (quality 95) in kB, as ddpo-pytorch's reward: higher = simpler image."""
    arrays = (pixels.detach().cpu() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(-buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def brightness(pixels: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
    """Mean pixel value in [0, 1] (differentiable)."""
    return pixels.mean(dim=(1, 2, 3))


def _toy_fidelity(pixels: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
    return toy.oracle_fidelity(pixels)


def _toy_safety(pixels: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
    return toy.oracle_safety(pixels)


# name -> (perspective -> function, differentiable)
BUILTINS: dict[str, tuple[dict[str, Pixels], bool]] = {
    "jpeg_compressibility": ({"jpeg_compressibility": jpeg_compressibility}, False),
    "brightness": ({"brightness": brightness}, True),
    "toy_alignment": ({"alignment": toy.oracle_alignment}, False),
    "toy_alignment_soft": ({"alignment": toy.alignment_score}, False),
    "toy_colour": ({"colour": toy.oracle_colour}, False),
    "toy_shape": ({"shape": toy.oracle_shape}, False),
    "toy_fidelity": ({"fidelity": _toy_fidelity}, False),
    "toy_safety": ({"safety": _toy_safety}, False),
    "toy_colour_soft": ({"colour": toy.colour_score}, True),
    "toy_oracles": ({"alignment": toy.oracle_alignment, "fidelity": _toy_fidelity, "safety": _toy_safety}, False),
}


def builtin_scorer(name: str) -> BuiltinScorer:
    """The built-in scorer called `name` (one of `BUILTINS`)."""
    if name not in BUILTINS:
        raise ValueError(f"builtin: unknown built-in reward {name!r}; choose one of {sorted(BUILTINS)}")
    functions, differentiable = BUILTINS[name]
    return BuiltinScorer(name, functions, differentiable)


def load_scorer(source: str, device: str | None = None) -> Scorer:
    """`builtin:NAME` -> a built-in scorer; anything else -> `reward.RewardModel.from_pretrained(source)`."""
    if source.startswith("builtin:"):
        return builtin_scorer(source.removeprefix("builtin:"))
    if not Path(source).is_dir():
        raise FileNotFoundError(
            f"model: no reward model directory {source} (or use builtin:NAME, one of {sorted(BUILTINS)})"
        )
    from reward import RewardModel  # heavy (transformers, peft): only when a model is asked for

    return RewardModel.from_pretrained(source, device=device or "cpu")


# ---------------------------------------------------------------------------------------------- config block
_SPEC_KEYS = {
    "builtin": ("builtin", "weighting", "batch_size", "differentiable"),
    "model": ("model", "weighting", "batch_size", "differentiable", "device"),
    "url": ("url", "token", "token_file", "weighting", "timeout", "retries", "batch_size"),
}


def build_reward(spec: Mapping[str, Any]) -> LocalReward | RemoteReward:
    """A reward function from the YAML `reward:` block, one of:

    - `{"builtin": NAME, "weighting": {...}?, "batch_size": 16?, "differentiable": bool?}` (differentiable
      defaults to what the built-in supports: brightness and toy_colour_soft are; others not);
    - `{"model": DIR, "weighting": {...}?, "batch_size": 16?, "differentiable": false?, "device": str?}`;
    - `{"url": URL, "token": str? or "token_file": PATH?, "weighting": {...}?, "timeout": 60?, "retries": 3?,
      "batch_size": 32?}`.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"reward: expected a mapping with one of 'builtin', 'model' or 'url', got {spec!r}")
    kinds = [kind for kind in _SPEC_KEYS if kind in spec]
    if len(kinds) != 1:
        raise ValueError(f"reward: expected exactly one of 'builtin', 'model' or 'url', got keys {sorted(spec)}")
    kind = kinds[0]
    unknown = sorted(set(spec) - set(_SPEC_KEYS[kind]))
    if unknown:
        raise ValueError(
            f"reward: unknown key(s) {unknown} for a {kind!r} reward; allowed keys: {list(_SPEC_KEYS[kind])}"
        )
    options = {key: spec[key] for key in ("weighting", "batch_size") if key in spec}
    if kind == "url":
        timeout = spec.get("timeout", 60.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"reward.timeout: expected a number of seconds > 0, got {timeout!r}")
        return RemoteReward(
            _string(spec, "url"),
            token=_token(spec),
            timeout=float(timeout),
            retries=spec.get("retries", 3),
            **options,
        )
    if kind == "builtin":
        scorer = builtin_scorer(_string(spec, "builtin"))
        differentiable = spec.get("differentiable", scorer.differentiable)
    else:
        scorer = load_scorer(_string(spec, "model"), device=spec.get("device"))
        differentiable = spec.get("differentiable", False)
    if not isinstance(differentiable, bool):
        raise TypeError(f"reward.differentiable: expected true or false, got {differentiable!r}")
    return LocalReward(scorer, differentiable=differentiable, **options)


def _string(spec: Mapping[str, Any], key: str) -> str:
    value = spec[key]
    if not isinstance(value, (str, Path)) or not str(value):
        raise TypeError(f"reward.{key}: expected a non-empty string, got {value!r}")
    return str(value)


def _token(spec: Mapping[str, Any]) -> str | None:
    if "token" in spec and "token_file" in spec:
        raise ValueError("reward: give 'token' or 'token_file', not both")
    if "token_file" in spec:
        path = Path(_string(spec, "token_file"))
        if not path.is_file():
            raise FileNotFoundError(f"reward.token_file: no such file {path}")
        return path.read_text().strip()
    return _string(spec, "token") if "token" in spec else None
