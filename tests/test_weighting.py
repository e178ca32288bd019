"""Multi-perspective weighting on hand-made numbers: each normalisation, clipping, gate, penalty, both levels."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.rewards.stats import EPS
from rlhf.rewards.weighting import Weighting


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_uniform_is_the_plain_sum():
    folded = Weighting.uniform(["a", "b"])({"a": t(1, 2), "b": t(10, 20)})
    close(folded.total, [11, 22])
    close(folded.normalized["a"], [1, 2])


def test_weights_and_number_shorthand():
    weighting = Weighting.from_config({"perspectives": {"a": 2.0, "b": {"weight": -0.5}}})
    close(weighting({"a": t(1, 2), "b": t(4, 8)}).total, [2 - 2, 4 - 4])


def test_batch_zscore_uses_population_std():
    weighting = Weighting.from_config({"perspectives": {"a": {"normalize": "batch"}}})
    # mean 2.5, population std sqrt(1.25)
    s = math.sqrt(1.25)
    close(weighting({"a": t(1, 2, 3, 4)}).total, [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s])


def test_batch_zscore_std_floor_for_a_constant_batch():
    weighting = Weighting.from_config({"perspectives": {"a": {"normalize": "batch", "std_floor": 0.5}}})
    close(weighting({"a": t(3, 3)}).total, [0, 0])
    weighting = Weighting.from_config({"perspectives": {"a": {"normalize": "batch", "std_floor": 2.0}}})
    close(weighting({"a": t(0, 2)}).total, [-0.5, 0.5])  # std 1 < floor 2


def test_running_cumulative_mean_std_includes_this_batch():
    weighting = Weighting.from_config({"perspectives": {"a": {"normalize": "running"}}})
    close(weighting({"a": t(0, 2)}).total, [-1, 1])  # mean 1, std 1
    # all four seen: mean 3, population variance (9 + 1 + 1 + 9) / 4 = 5
    close(weighting({"a": t(4, 6)}).total, [1 / math.sqrt(5), 3 / math.sqrt(5)])
    assert weighting.state_dict()["running"]["a"] == {"count": 4, "mean": 3.0, "var": 5.0}


def test_running_ema_momentum():
    weighting = Weighting.from_config({"perspectives": {"a": {"normalize": "running", "momentum": 0.5}}})
    weighting({"a": t(0, 2)})  # first batch initialises: mean 1, var 1
    # batch mean 5, var 1 -> mean 0.5*1 + 0.5*5 = 3, var 1
    close(weighting({"a": t(4, 6)}).total, [1, 3])


def test_per_prompt_history_tracker_at_reward_level():
    weighting = Weighting.from_config(
        {"perspectives": {"a": {"normalize": "per_prompt", "buffer_size": 4, "min_count": 2}}}
    )
    # p: mean 2, std 1; q: mean 12, std 2
    close(weighting({"a": t(1, 3, 10, 14)}, ["p", "p", "q", "q"]).total, [-1 / (1 + EPS), 1 / (1 + EPS), -1, 1])
    # the history counts: p now holds 1, 3, 5 -> mean 3, std sqrt(8/3)
    close(weighting({"a": t(5)}, ["p"]).total, [2 / (math.sqrt(8 / 3) + EPS)])


def test_per_prompt_uses_batch_stats_until_min_count():
    weighting = Weighting.from_config(
        {"perspectives": {"a": {"normalize": "per_prompt", "buffer_size": 8, "min_count": 3}}}
    )
    # each prompt has 2 < 3 scores: batch mean 7, population std sqrt(((6^2)+(4^2)+(3^2)+(7^2))/4)
    s = math.sqrt((36 + 16 + 9 + 49) / 4)
    close(weighting({"a": t(1, 3, 10, 14)}, ["p", "p", "q", "q"]).total, [(v - 7) / (s + EPS) for v in (1, 3, 10, 14)])


def test_clip_symmetric_and_range():
    weighting = Weighting.from_config({"perspectives": {"a": {"clip": 1.5}, "b": {"clip": [0, 2]}}})
    folded = weighting({"a": t(-3, 0.5, 3), "b": t(-1, 1, 5)})
    close(folded.normalized["a"], [-1.5, 0.5, 1.5])
    close(folded.normalized["b"], [0, 1, 2])
    close(folded.total, [-1.5, 1.5, 3.5])


def test_gate_sets_total_to_floor_below_threshold_on_raw_score():
    weighting = Weighting.from_config(
        {"perspectives": {"a": {"normalize": "batch"}, "safety": {"constraint": "gate", "threshold": 0.5, "floor": -10}}}
    )
    folded = weighting({"a": t(0, 2, 4), "safety": t(0.9, 0.1, 0.5)})
    s = math.sqrt(8 / 3)
    close(folded.total, [-2 / s, -10, 2 / s])  # 0.5 is not below 0.5
    assert folded.violated["safety"].tolist() == [False, True, False]
    assert "safety" not in folded.normalized


def test_penalty_subtracts_and_gate_wins_over_penalty():
    weighting = Weighting.from_config(
        {
            "perspectives": {
                "a": 1.0,
                "fidelity": {"constraint": "penalty", "threshold": 0.0, "penalty": 3},
                "safety": {"constraint": "gate", "threshold": 0.0, "floor": -1},
            }
        }
    )
    folded = weighting({"a": t(5, 5, 5, 5), "fidelity": t(1, -1, 1, -1), "safety": t(1, 1, -1, -1)})
    close(folded.total, [5, 2, -1, -1])


def test_advantage_level_gdpo_per_perspective_then_batch_normalised():
    weighting = Weighting.from_config({"level": "advantage", "perspectives": {"a": 2.0, "b": 1.0}})
    raw = {"a": t(1, 0, 3, 3), "b": t(0, 4, 1, 2)}
    prompts = ["p", "p", "q", "q"]
    # a per prompt: p [1, 0] -> [1, -1]; q [3, 3] -> [0, 0].  b: p [0, 4] -> [-1, 1]; q [1, 2] -> [-1, 1]
    # 2a + b = [1, -1, -1, 1] -> batch z-score (mean 0, std 1) -> unchanged
    folded = weighting.advantages(raw, prompts)
    close(folded.normalized["a"], [1 / (1 + EPS), -1 / (1 + EPS), 0, 0])
    close(folded.total, [1, -1, -1, 1])
    # GRPO on the summed reward 2a + b = [2, 4, 7, 8] would rank p's samples the other way round
    # the call itself gives the plain weighted sum of raw scores, for logging and evaluation
    close(weighting(raw, prompts).total, [2, 4, 7, 8])


def test_advantage_level_batch_normalisation_and_gate_in_advantage_units():
    weighting = Weighting.from_config(
        {
            "level": "advantage",
            "perspectives": {
                "a": {"normalize": "none", "weight": 2.0},
                "safety": {"constraint": "gate", "threshold": 0, "floor": -3},
            },
        }
    )
    folded = weighting.advantages({"a": t(1, 2, 3, 4), "safety": t(1, 1, 1, -1)}, ["x"] * 4)
    s = math.sqrt(1.25)
    close(folded.total, [-1.5 / s, -0.5 / s, 0.5 / s, -3])


def test_non_finite_scores_give_nan_total_without_poisoning_statistics():
    weighting = Weighting.from_config({"perspectives": {"a": {"normalize": "batch"}, "b": 1.0}})
    folded = weighting({"a": t(0, float("nan"), 2), "b": t(0, 0, float("inf"))})
    assert math.isnan(folded.total[1]) and math.isnan(folded.total[2])
    close(folded.total[:1], [-1])  # batch stats over the finite a values [0, 2]
    grouped = Weighting.from_config({"level": "advantage", "perspectives": {"a": 1.0}})
    advantages = grouped.advantages({"a": t(1, 3, float("nan"), 5)}, ["p", "p", "p", "q"]).total
    assert math.isnan(advantages[2]) and torch.isfinite(advantages[[0, 1, 3]]).all()


def test_state_dict_resume_is_exact():
    config = {
        "perspectives": {
            "a": {"normalize": "running"},
            "b": {"normalize": "running", "momentum": 0.9},
            "c": {"normalize": "per_prompt", "buffer_size": 3, "min_count": 2},
        }
    }
    generator = torch.Generator().manual_seed(0)
    batches = [{name: torch.randn(6, generator=generator) for name in "abc"} for _ in range(4)]
    prompts = ["p", "q", "r"] * 2
    uninterrupted = Weighting.from_config(config)
    expected = [uninterrupted(batch, prompts).total for batch in batches]
    first = Weighting.from_config(config)
    for batch in batches[:2]:
        first(batch, prompts)
    resumed = Weighting.from_config(config)
    resumed.load_state_dict(first.state_dict())
    for batch, want in zip(batches[2:], expected[2:]):
        torch.testing.assert_close(resumed(batch, prompts).total, want)
    with pytest.raises(ValueError, match="running statistics"):
        Weighting.from_config({"perspectives": {"a": 1.0}}).load_state_dict(first.state_dict())


def test_batch_and_running_normalisation_keep_the_graph():
    weighting = Weighting.from_config({"perspectives": {"a": {"normalize": "batch"}, "b": {"normalize": "running"}}})
    assert weighting.differentiable
    a = t(1, 2, 5).requires_grad_(True)
    b = t(3, 3, 3).requires_grad_(True)  # constant batch: the std floor must keep the gradient finite
    weighting({"a": a, "b": b}).total.pow(2).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    assert torch.isfinite(b.grad).all()
    assert not Weighting.from_config({"perspectives": {"a": {"normalize": "per_prompt"}}}).differentiable


def test_to_config_round_trip():
    config = {
        "level": "reward",
        "perspectives": {
            "a": {"weight": 0.5, "normalize": "running", "momentum": 0.9, "clip": [-2, 3]},
            "s": {"constraint": "gate", "threshold": 0.1, "floor": -4},
            "f": {"constraint": "penalty", "threshold": 0, "penalty": 1},
        },
    }
    rebuilt = Weighting.from_config(Weighting.from_config(config).to_config())
    assert rebuilt.to_config() == Weighting.from_config(config).to_config()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"perspectives": {"safetyy": 1.0}}, r"perspectives\.safetyy: unknown perspective"),
        ({"perspectives": {"a": {"normalize": "batch", "std_floor": -1}}}, r"a\.std_floor: expected a number > 0"),
        ({"perspectives": {"a": {"std_floor": 0.1}}}, r"a\.std_floor: does not apply to normalize 'none'"),
        ({"perspectives": {"a": 1.0, "s": {"constraint": "gate", "floor": 0}}}, r"s: a 'gate' needs a 'threshold'"),
        ({"perspectives": {"a": 1.0, "s": {"constraint": "gate", "threshold": 0}}}, r"s: a 'gate' needs a 'floor'"),
        ({"perspectives": {"a": 1.0, "s": {"constraint": "penalty", "threshold": 0}}}, r"needs a 'penalty'"),
        ({"perspectives": {"a": 1.0, "s": {"constraint": "penalty", "threshold": 0, "penalty": -1}}}, r"penalty: expected a number > 0"),
        ({"perspectives": {"a": 1.0, "s": {"constraint": "gate", "threshold": 0, "floor": 0, "weight": 1}}}, r"\['weight'\] do not apply to constraint 'gate'"),
        ({"perspectives": {"a": {"normalize": "zscore"}}}, r"a\.normalize: expected one of"),
        ({"perspectives": {"a": {"constraint": "veto"}}}, r"a\.constraint: expected one of"),
        ({"perspectives": {"a": {"wieght": 2}}}, r"\['wieght'\] do not apply"),
        ({"perspectives": {"a": {"normalize": "batch", "momentum": 0.9}}}, r"a\.momentum: does not apply"),
        ({"perspectives": {"a": {"normalize": "running", "momentum": 1.5}}}, r"a\.momentum: expected a number in \(0, 1\)"),
        ({"level": "advantage", "perspectives": {"a": {"buffer_size": 4}}}, r"a\.buffer_size: does not apply .* level 'advantage'"),
        ({"perspectives": {"a": {"normalize": "per_prompt", "min_count": 0}}}, r"a\.min_count: expected an integer >= 1"),
        ({"perspectives": {"a": {"clip": [2, 1]}}}, r"a\.clip: expected a number c > 0 or a pair"),
        ({"perspectives": {"a": {"clip": -1}}}, r"a\.clip: a single bound must be > 0"),
        ({"perspectives": {"a": {"weight": "heavy"}}}, r"a\.weight: expected a finite number"),
        ({"perspectives": {"a": True}}, r"a: expected a weight \(number\) or a mapping"),
        ({"perspectives": {"s": {"constraint": "gate", "threshold": 0, "floor": 0}}}, r"at least one perspective must be a 'term'"),
        ({"level": "episode", "perspectives": {"a": 1.0}}, r"weighting\.level: expected one of"),
        ({"perspectives": {}}, r"weighting\.perspectives: expected a non-empty mapping"),
        ({"perspectives": {"a": 1.0}, "normalise": "batch"}, r"weighting: unknown key\(s\) \['normalise'\]"),
    ],
)
def test_invalid_configs_are_clear_errors(config, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Weighting.from_config(config, perspectives=["a", "s", "f"])


def test_missing_scores_and_mismatched_sizes_are_errors():
    weighting = Weighting.from_config({"perspectives": {"a": 1.0, "b": 1.0}})
    with pytest.raises(ValueError, match=r"perspective\(s\) \['b'\] are missing"):
        weighting({"a": t(1)})
    with pytest.raises(ValueError, match="different batch sizes"):
        weighting({"a": t(1), "b": t(1, 2)})
    with pytest.raises(ValueError, match="'per_prompt' needs the prompts"):
        Weighting.from_config({"perspectives": {"a": {"normalize": "per_prompt"}}})({"a": t(1)})
