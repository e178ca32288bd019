"""Multi-perspective reward weighting: per-perspective normalisation, clipping and constraints folded into one
reward (normalise, weight, sum) or one advantage (GDPO-style: each perspective its own advantage, then weighted)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from rlhf.rewards.stats import PerPromptStatTracker, group_advantages

LEVELS = ("reward", "advantage")
NORMALIZATIONS = ("none", "batch", "running", "per_prompt")
CONSTRAINTS = ("term", "gate", "penalty")
# keys a perspective accepts, by its constraint; anything else is an error naming the key
_ALLOWED_KEYS = {
    "term": ("constraint", "weight", "normalize", "std_floor", "momentum", "buffer_size", "min_count", "clip"),
    "gate": ("constraint", "threshold", "floor"),
    "penalty": ("constraint", "threshold", "penalty"),
}
# the final batch normalisation of GDPO's summed advantage guards a constant batch with this floor
ADVANTAGE_STD_FLOOR = 1e-6


@dataclass
class PerspectiveRule:
    """How one perspective enters the total.

    Fields:
        name: the perspective (a key of the scorer's output).
        constraint: "term" (default; adds `weight * clip(normalize(score))` to the total), "gate" (when the raw
            score is below `threshold`, the sample's total is set to `floor`; the usual choice for safety) or
            "penalty" (when the raw score is below `threshold`, `penalty` is subtracted from the total).
        weight: term only, default 1.0.
        normalize: term only. "none"; "batch" (z-score over the batch); "running" (z-score with the mean/std of
            every score seen so far, this batch included; see `momentum`); "per_prompt" (z-score among the
            samples that share a prompt, by `rlhf.rewards.stats`: when folding rewards, against each prompt's recent
            history (`PerPromptStatTracker(buffer_size, min_count)`, which uses the batch's statistics until a
            prompt has `min_count` scores); in `advantages`, within the prompt's group of the batch (a group of one
            gets 0); not differentiable). Default "none" at level "reward", "per_prompt" at level "advantage".
            Std is the population std.
        std_floor: "batch"/"running" only, default 1e-6: the std is clamped to at least this (> 0) before
            dividing ("per_prompt" adds `rlhf.rewards.stats.EPS` to the std instead, as the DDPO trainer does).
        momentum: "running" only, default None = exact cumulative mean/std; a float in (0, 1) = exponential
            moving average of the batch mean and variance (for rewards that drift as the policy improves).
        buffer_size, min_count: "per_prompt" at level "reward" only, defaults 16 and 16 (TRL's DDPO defaults).
        clip: term only, default None; a number c clips the normalised score to [-c, c], a pair [lo, hi] to it.
        threshold: gate/penalty, required; compared with the RAW score.
        floor: gate, required: the total of a gated sample (at level "advantage", an advantage value).
        penalty: penalty, required, > 0.
    """

    name: str
    constraint: str = "term"
    weight: float = 1.0
    normalize: str = "none"
    std_floor: float = 1e-6
    momentum: float | None = None
    buffer_size: int = 16
    min_count: int = 16
    clip: tuple[float, float] | None = None
    threshold: float | None = None
    floor: float | None = None
    penalty: float | None = None


@dataclass
class Folded:
    """The result of folding per-perspective scores: `total` (1-D float32), `normalized` (each term
    perspective's normalised and clipped score) and `violated` (each gate/penalty perspective's bool mask)."""

    total: Tensor
    normalized: dict[str, Tensor] = field(default_factory=dict)
    violated: dict[str, Tensor] = field(default_factory=dict)


class _RunningMoments:
    """Mean and variance of every finite score seen so far (Welford), or their exponential moving average."""

    def __init__(self, momentum: float | None) -> None:
        self.momentum = momentum
        self.count = 0
        self.mean = 0.0
        self.var = 0.0

    def update(self, values: Tensor) -> None:
        values = values.detach().double().flatten()
        values = values[torch.isfinite(values)]
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_var = values.var(unbiased=False).item()
        if self.momentum is not None and self.count > 0:
            self.mean = self.momentum * self.mean + (1 - self.momentum) * batch_mean
            self.var = self.momentum * self.var + (1 - self.momentum) * batch_var
        else:
            # Chan et al. parallel combination of (count, mean, var) with the batch's
            total = self.count + n
            delta = batch_mean - self.mean
            m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / total
            self.mean += delta * n / total
            self.var = m2 / total
        self.count += n

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.count, self.mean, self.var = int(state["count"]), float(state["mean"]), float(state["var"])


class Weighting:
    """Folds per-perspective scores into one reward per sample, or one advantage per sample.

    Build it with `Weighting.from_config({...})` (the YAML `weighting:` block) or `Weighting.uniform(names)`
    (every perspective weight 1, no normalisation: the default of a reward function without weighting).

    Level "reward": `weighting(raw, prompts)` normalises, clips and weights each term perspective, sums them,
    then applies penalties and gates; trainers compute their advantages from that total.
    Level "advantage" (GDPO): `weighting(raw, prompts)` gives the plain weighted sum of raw scores (with
    constraints) for logging and evaluation, and trainers call `weighting.advantages(raw, prompts)` on the
    scores of a whole epoch: each perspective normalised on its own (per prompt by default), clipped, weighted
    and summed, the sum z-scored over the batch, then penalties and gates applied in advantage units.
    A sample whose raw score is not finite in any perspective used gets a NaN total (trainers drop it); the
    statistics are computed over the finite scores only. All arithmetic is float32 or wider.
    """

    def __init__(self, rules: Sequence[PerspectiveRule], level: str = "reward") -> None:
        self.rules = list(rules)
        self.level = level
        self._running = {
            rule.name: _RunningMoments(rule.momentum) for rule in self.rules if rule.normalize == "running"
        }
        self._trackers = {
            rule.name: PerPromptStatTracker(rule.buffer_size, rule.min_count)
            for rule in self.rules
            if rule.normalize == "per_prompt" and level == "reward"
        }

    # ------------------------------------------------------------------ building
    @classmethod
    def uniform(cls, perspectives: Sequence[str]) -> Weighting:
        """Every perspective weight 1, no normalisation, no constraint."""
        if not perspectives:
            raise ValueError("weighting: the reward has no perspectives to weight")
        return cls([PerspectiveRule(name) for name in perspectives])

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, perspectives: Sequence[str] | None = None) -> Weighting:
        """Build from a config mapping `{"level": ..., "perspectives": {name: weight | {option: value}}}`.

        Only the perspectives listed count. When `perspectives` (the scorer's names) is given, a name not in it
        is an error. An empty or None config means `uniform(perspectives)`.
        """
        if not config:
            if perspectives is None:
                raise ValueError("weighting: an empty weighting needs the reward's perspectives")
            return cls.uniform(perspectives)
        if not isinstance(config, Mapping):
            raise TypeError(f"weighting: expected a mapping with 'level' and 'perspectives', got {config!r}")
        unknown = sorted(set(config) - {"level", "perspectives"})
        if unknown:
            raise ValueError(f"weighting: unknown key(s) {unknown}; allowed keys: ['level', 'perspectives']")
        level = config.get("level", "reward")
        if level not in LEVELS:
            raise ValueError(f"weighting.level: expected one of {list(LEVELS)}, got {level!r}")
        entries = config.get("perspectives")
        if not isinstance(entries, Mapping) or not entries:
            raise ValueError(
                "weighting.perspectives: expected a non-empty mapping of perspective name to a weight or to "
                f"options, got {entries!r}"
            )
        rules = [_parse_rule(str(name), entry, level, perspectives) for name, entry in entries.items()]
        if not any(rule.constraint == "term" for rule in rules):
            raise ValueError("weighting.perspectives: at least one perspective must be a 'term' (gates and "
                             "penalties alone give no reward to fold)")
        return cls(rules, level)

    def to_config(self) -> dict[str, Any]:
        """The config mapping that rebuilds this weighting (state excluded)."""
        out: dict[str, Any] = {}
        for rule in self.rules:
            keys = [key for key in _ALLOWED_KEYS[rule.constraint] if _applies(key, rule, self.level)]
            entry = {key: getattr(rule, key) for key in keys if getattr(rule, key) is not None}
            if entry.get("clip") is not None:
                entry["clip"] = list(entry["clip"])
            out[rule.name] = entry
        return {"level": self.level, "perspectives": out}

    @property
    def perspectives(self) -> list[str]:
        """The perspectives this weighting reads (terms and constraints)."""
        return [rule.name for rule in self.rules]

    @property
    def differentiable(self) -> bool:
        """Whether rewards keep the graph to the raw scores ("per_prompt" statistics are computed detached)."""
        return all(rule.normalize != "per_prompt" for rule in self.rules)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Running statistics and per-prompt histories, so a resumed run normalises exactly as the
        uninterrupted one."""
        return {
            "running": {name: moments.state_dict() for name, moments in self._running.items()},
            "per_prompt": {name: tracker.state_dict() for name, tracker in self._trackers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, kept in (("running", self._running), ("per_prompt", self._trackers)):
            saved = dict(state.get(key, {}))
            if set(saved) != set(kept):
                raise ValueError(
                    f"weighting state: {key} statistics for {sorted(saved)}, but this weighting keeps them for "
                    f"{sorted(kept)}"
                )
            for name, values in saved.items():
                kept[name].load_state_dict(values)

    # ------------------------------------------------------------------ folding
    def __call__(self, raw: Mapping[str, Tensor], prompts: Sequence[str] | None = None) -> Folded:
        """Fold one batch of raw scores into rewards (see the class docstring for each level)."""
        raw = self._checked(raw, prompts)
        terms = [rule for rule in self.rules if rule.constraint == "term"]
        if self.level == "advantage":
            normalized = {rule.name: raw[rule.name] for rule in terms}
        else:
            normalized = {rule.name: self._normalize(rule, raw[rule.name], prompts) for rule in terms}
        total = sum(rule.weight * normalized[rule.name] for rule in terms)
        return self._finish(total, normalized, raw)

    def advantages(self, raw: Mapping[str, Tensor], prompts: Sequence[str] | None = None) -> Folded:
        """GDPO: each perspective normalised on its own, clipped, weighted and summed; the sum z-scored over the
        batch; then penalties and gates. Call it on the scores of a whole epoch (gathered across processes)."""
        raw = self._checked(raw, prompts)
        terms = [rule for rule in self.rules if rule.constraint == "term"]
        normalized = {rule.name: self._normalize(rule, raw[rule.name], prompts, grouped=True) for rule in terms}
        total = sum(rule.weight * normalized[rule.name] for rule in terms)
        mean, var = _finite_mean_var(total)
        total = (total - mean) / _std(var, ADVANTAGE_STD_FLOOR)
        return self._finish(total, normalized, raw)

    def _finish(self, total: Tensor, normalized: dict[str, Tensor], raw: dict[str, Tensor]) -> Folded:
        violated = {}
        for rule in self.rules:
            if rule.constraint == "penalty":
                violated[rule.name] = raw[rule.name] < rule.threshold
                total = total - rule.penalty * violated[rule.name].to(total.dtype)
        for rule in self.rules:  # gates after penalties: a gated sample's total is exactly its floor
            if rule.constraint == "gate":
                violated[rule.name] = raw[rule.name] < rule.threshold
                total = torch.where(violated[rule.name], torch.full_like(total, rule.floor), total)
        finite = torch.stack([torch.isfinite(raw[rule.name]) for rule in self.rules]).all(dim=0)
        total = torch.where(finite, total, torch.full_like(total, math.nan))
        return Folded(total.float(), normalized, violated)

    def _checked(self, raw: Mapping[str, Tensor], prompts: Sequence[str] | None) -> dict[str, Tensor]:
        missing = [name for name in self.perspectives if name not in raw]
        if missing:
            raise ValueError(f"weighting: scores for perspective(s) {missing} are missing; got {sorted(raw)}")
        checked = {}
        for name in self.perspectives:
            scores = torch.as_tensor(raw[name])
            if scores.dim() != 1:
                raise ValueError(f"weighting: scores of {name!r} must be 1-D, got shape {tuple(scores.shape)}")
            checked[name] = scores.float() if scores.dtype != torch.float64 else scores
        sizes = {name: scores.numel() for name, scores in checked.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"weighting: perspectives have different batch sizes {sizes}")
        if prompts is not None and len(prompts) != next(iter(sizes.values())):
            raise ValueError(f"weighting: {len(prompts)} prompts for {next(iter(sizes.values()))} scores")
        return checked

    def _normalize(
        self, rule: PerspectiveRule, scores: Tensor, prompts: Sequence[str] | None, grouped: bool = False
    ) -> Tensor:
        """`grouped`: per-prompt statistics within this batch (advantages) rather than each prompt's history."""
        if rule.normalize == "per_prompt":
            normalized = self._per_prompt(rule, scores, prompts, grouped)
        elif rule.normalize == "none":
            normalized = scores
        else:
            if rule.normalize == "batch":
                mean, var = _finite_mean_var(scores)
            else:
                moments = self._running[rule.name]
                moments.update(scores)
                mean, var = (torch.tensor(value, dtype=scores.dtype) for value in (moments.mean, moments.var))
            normalized = (scores - mean) / _std(var, rule.std_floor)
        if rule.clip is not None:
            normalized = normalized.clamp(*rule.clip)
        return normalized

    def _per_prompt(
        self, rule: PerspectiveRule, scores: Tensor, prompts: Sequence[str] | None, grouped: bool
    ) -> Tensor:
        if prompts is None:
            raise ValueError(f"weighting.perspectives.{rule.name}.normalize: 'per_prompt' needs the prompts")
        # only finite scores enter the statistics; the others stay NaN (the trainer drops those samples)
        finite = torch.isfinite(scores.detach()).cpu()
        kept = [prompt for prompt, ok in zip(prompts, finite.tolist()) if ok]
        normalized = torch.full_like(scores, math.nan)
        if kept:
            values = scores.detach().cpu()[finite]
            if grouped:
                advantages = group_advantages(values, kept)
            else:
                advantages = self._trackers[rule.name].update(kept, values)
            normalized[finite.to(scores.device)] = advantages.to(scores.device, scores.dtype)
        return normalized


def _finite_mean_var(values: Tensor) -> tuple[Tensor, Tensor]:
    """Population mean and variance over the finite entries (0 and 0 when there are none)."""
    finite = torch.isfinite(values)
    count = finite.sum().clamp_min(1)
    safe = torch.where(finite, values, torch.zeros_like(values))
    mean = safe.sum() / count
    var = torch.where(finite, (safe - mean) ** 2, torch.zeros_like(values)).sum() / count
    return mean, var


def _std(var: Tensor, floor: float) -> Tensor:
    # clamping the variance (not the std) keeps the gradient finite for a constant batch, where sqrt'(0) is inf
    return var.clamp_min(floor * floor).sqrt()


def _parse_rule(name: str, entry: Any, level: str, perspectives: Sequence[str] | None) -> PerspectiveRule:
    where = f"weighting.perspectives.{name}"
    if perspectives is not None and name not in perspectives:
        raise ValueError(f"{where}: unknown perspective {name!r}; the reward has {list(perspectives)}")
    if isinstance(entry, bool) or not isinstance(entry, (int, float, Mapping)):
        raise TypeError(f"{where}: expected a weight (number) or a mapping of options, got {entry!r}")
    options = {"weight": entry} if isinstance(entry, (int, float)) else dict(entry)
    constraint = options.get("constraint", "term")
    if constraint not in CONSTRAINTS:
        raise ValueError(f"{where}.constraint: expected one of {list(CONSTRAINTS)}, got {constraint!r}")
    unknown = sorted(set(options) - set(_ALLOWED_KEYS[constraint]))
    if unknown:
        raise ValueError(
            f"{where}: key(s) {unknown} do not apply to constraint {constraint!r}; allowed keys: "
            f"{list(_ALLOWED_KEYS[constraint])}"
        )
    rule = PerspectiveRule(name=name, constraint=constraint)
    if constraint == "term":
        rule.weight = _number(options, "weight", where, default=1.0)
        rule.normalize = options.get("normalize", "per_prompt" if level == "advantage" else "none")
        if rule.normalize not in NORMALIZATIONS:
            raise ValueError(f"{where}.normalize: expected one of {list(NORMALIZATIONS)}, got {rule.normalize!r}")
        for key in ("std_floor", "momentum", "buffer_size", "min_count"):
            if key in options and not _applies(key, rule, level):
                raise ValueError(f"{where}.{key}: does not apply to normalize {rule.normalize!r} at level {level!r}")
        rule.std_floor = _number(options, "std_floor", where, default=1e-6)
        if rule.std_floor <= 0:
            raise ValueError(f"{where}.std_floor: expected a number > 0, got {rule.std_floor}")
        if "momentum" in options:
            rule.momentum = _number(options, "momentum", where)
            if not 0 < rule.momentum < 1:
                raise ValueError(f"{where}.momentum: expected a number in (0, 1), got {rule.momentum}")
        for key in ("buffer_size", "min_count"):
            if key in options:
                count = options[key]
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise ValueError(f"{where}.{key}: expected an integer >= 1, got {count!r}")
                setattr(rule, key, count)
        rule.clip = _clip_range(options.get("clip"), where)
        return rule
    if "threshold" not in options:
        raise ValueError(f"{where}: a {constraint!r} needs a 'threshold' (compared with the raw score)")
    rule.threshold = _number(options, "threshold", where)
    if constraint == "gate":
        if "floor" not in options:
            raise ValueError(f"{where}: a 'gate' needs a 'floor' (the total of a sample below the threshold)")
        rule.floor = _number(options, "floor", where)
    else:
        if "penalty" not in options:
            raise ValueError(f"{where}: a 'penalty' constraint needs a 'penalty' amount (> 0)")
        rule.penalty = _number(options, "penalty", where)
        if rule.penalty <= 0:
            raise ValueError(f"{where}.penalty: expected a number > 0, got {rule.penalty}")
    return rule


def _applies(key: str, rule: PerspectiveRule, level: str) -> bool:
    """Whether a term option means anything for this rule's normalisation and the weighting's level."""
    if key == "std_floor":
        return rule.normalize in ("batch", "running")
    if key == "momentum":
        return rule.normalize == "running"
    if key in ("buffer_size", "min_count"):
        return rule.normalize == "per_prompt" and level == "reward"
    return True


def _number(options: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}.{key}: expected a finite number, got {value!r}")
    return float(value)


def _clip_range(value: Any, where: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{where}.clip: a single bound must be > 0 (clips to [-c, c]), got {value}")
        return (-float(value), float(value))
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        low, high = (_number({"bound": bound}, "bound", f"{where}.clip") for bound in value)
        if low < high:
            return (low, high)
    raise ValueError(f"{where}.clip: expected a number c > 0 or a pair [low, high] with low < high, got {value!r}")
