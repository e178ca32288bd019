"""Losses equal their formulas on fixed tensors; tie policies and classification metrics give the numbers
computed by hand on small examples."""

from __future__ import annotations

import math

import pytest
import torch

from reward.losses import (
    bradley_terry_loss,
    center_penalty,
    choose_tie_eps,
    classification_loss,
    classification_metrics,
    pairwise_accuracy,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_loss_equals_its_formula():
    chosen, rejected = [1.0, 0.2, -0.5], [0.5, 0.4, -0.5]
    tau, margin = 0.1, 0.1
    expected = -sum(log_sigmoid((c - r - margin) / tau) for c, r in zip(chosen, rejected)) / 3
    loss = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected), tau=tau, margin=margin)
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    per_pair_margin = torch.tensor([0.0, 0.2, 0.1])
    expected = -sum(log_sigmoid((c - r - m) / 0.5) for c, r, m in zip(chosen, rejected, [0.0, 0.2, 0.1])) / 3
    loss = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected), tau=0.5, margin=per_pair_margin)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_ties_use_a_half_target_without_margin():
    chosen, rejected, ties = [1.0, 0.3], [0.5, 0.5], [False, True]
    tau, margin = 0.1, 0.2
    decided = -log_sigmoid((1.0 - 0.5 - margin) / tau)
    tie = -(log_sigmoid(-0.2 / tau) + log_sigmoid(0.2 / tau)) / 2
    loss = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected), tau=tau, margin=margin, ties=ties)
    assert loss.item() == pytest.approx((decided + tie) / 2, rel=1e-6)


def test_bradley_terry_gradient_flows_and_half_precision_is_upcast():
    chosen = torch.tensor([0.3, 0.1], requires_grad=True)
    bradley_terry_loss(chosen, torch.tensor([0.0, 0.2])).backward()
    assert chosen.grad is not None and bool((chosen.grad < 0).all())  # raising a chosen reward lowers the loss
    assert bradley_terry_loss(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0.0])).dtype == torch.float32


def test_center_penalty_and_classification_loss_equal_their_formulas():
    chosen, rejected = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, -0.5])
    assert center_penalty(chosen, rejected).item() == pytest.approx((1.5**2 + 1.0**2 + 0.0**2) / 3)
    assert center_penalty(chosen).item() == pytest.approx((1.0 + 4.0 + 0.25) / 3)

    logits, labels = [2.0, -1.0, 0.0], [1, 0, 1]
    expected = -(log_sigmoid(2.0) + log_sigmoid(1.0) + log_sigmoid(0.0)) / 3  # BCE: -log p(y) per example
    assert classification_loss(torch.tensor(logits), torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="labels must hold only 0/1"):
        classification_loss(torch.tensor(logits), torch.tensor([1, 2, 0]))


# Six pairs, rewards chosen so that sigmoid((r_chosen - r_rejected) / tau) is exactly p (r_rejected = 0).
TAU = 0.1
P = [0.9, 0.3, 0.52, 0.5, 0.53, 0.46]  # |p - 1/2| = 0.4, 0.2, 0.02, 0, 0.03, 0.04
TIES = [False, False, False, False, True, True]
CHOSEN = torch.tensor([TAU * math.log(p / (1 - p)) for p in P], dtype=torch.float64)
REJECTED = torch.zeros(6, dtype=torch.float64)


def test_tie_policies_match_hand_computation():
    # drop: the four decided pairs score 1, 0, 1 and 1/2 (exactly equal rewards) -> 2.5 / 4
    drop = pairwise_accuracy(CHOSEN, REJECTED, TIES, policy="drop")
    assert drop == {"accuracy": pytest.approx(0.625), "tie_policy": "drop", "num_ties": 2, "num_pairs": 4}
    # half: the same 2.5 plus 1/2 for each of the two ties, over all six pairs
    half = pairwise_accuracy(CHOSEN, REJECTED, TIES, policy="half")
    assert half == {"accuracy": pytest.approx(3.5 / 6), "tie_policy": "half", "num_ties": 2, "num_pairs": 6}
    # predict_ties, eps 0.01: only pair 3 (|p - 1/2| = 0) is called a tie; right: pairs 0 and 2 -> 2 / 6
    low = pairwise_accuracy(CHOSEN, REJECTED, TIES, policy="predict_ties", eps=0.01, tau=TAU)
    assert (low["accuracy"], low["tie_policy"], low["eps"]) == (pytest.approx(2 / 6), "predict_ties", 0.01)
    # eps 0.12: pairs 2, 3, 4, 5 are called ties; right: pair 0 and the two real ties 4, 5 -> 3 / 6
    high = pairwise_accuracy(CHOSEN, REJECTED, TIES, policy="predict_ties", eps=0.12, tau=TAU)
    assert high["accuracy"] == pytest.approx(3 / 6)
    # without tie labels every pair is decided: 1, 0, 1, 1/2, 1, 0
    assert pairwise_accuracy(CHOSEN, REJECTED)["accuracy"] == pytest.approx(3.5 / 6)


def test_choose_tie_eps_finds_the_best_cut_by_hand():
    # sorted |p - 1/2|: 0 (decided, wrong), .02 (decided, right), .03 (tie), .04 (tie), .2 (wrong), .4 (right).
    # Calling the k smallest ties gets right: k=1: 2, k=2: 1, k=3: 2, k=4: 3, k=5: 3, k=6: 2 (k=0 impossible:
    # eps 0 still calls the exact coin flip a tie). Best and smallest: k=4, eps midway between .04 and .2.
    chosen = choose_tie_eps(CHOSEN, REJECTED, TIES, tau=TAU)
    assert chosen["eps"] == pytest.approx(0.12)
    assert (chosen["accuracy"], chosen["tie_policy"], chosen["num_pairs"]) == (pytest.approx(0.5), "predict_ties", 6)
    replay = pairwise_accuracy(CHOSEN, REJECTED, TIES, policy="predict_ties", eps=chosen["eps"], tau=TAU)
    assert replay["accuracy"] == pytest.approx(chosen["accuracy"])
    # with no ties at all the best eps predicts none
    no_ties = choose_tie_eps(torch.tensor([1.0, -1.0, 0.5]), torch.zeros(3), [False] * 3)
    assert no_ties["eps"] == 0.0 and no_ties["accuracy"] == pytest.approx(2 / 3)


def test_pairwise_accuracy_rejects_unclear_requests():
    with pytest.raises(ValueError, match="policy must be one of"):
        pairwise_accuracy(CHOSEN, REJECTED, TIES, policy="ignore")
    with pytest.raises(ValueError, match="needs eps"):
        pairwise_accuracy(CHOSEN, REJECTED, TIES, policy="predict_ties")
    with pytest.raises(ValueError, match="every pair is a tie"):
        pairwise_accuracy(CHOSEN[:2], REJECTED[:2], [True, True], policy="drop")
    with pytest.raises(ValueError, match="same length"):
        pairwise_accuracy(CHOSEN, REJECTED[:3])


def test_classification_metrics_by_hand():
    logits, labels = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0]), torch.tensor([1, 1, 0, 0, 1])
    # threshold 0 (logit > 0 is positive): TP 1, FP 1, FN 2, TN 1
    assert classification_metrics(logits, labels) == {
        "accuracy": pytest.approx(0.4), "precision": pytest.approx(0.5), "recall": pytest.approx(1 / 3),
        "f1": pytest.approx(0.4), "threshold": 0.0, "positive_label": 1, "num_examples": 5}
    # threshold -1.5: TP 3, FP 1, FN 0, TN 1
    lower = classification_metrics(logits, labels, threshold=-1.5)
    assert (lower["accuracy"], lower["precision"], lower["recall"], lower["f1"], lower["threshold"]) == (
        pytest.approx(0.8), pytest.approx(0.75), 1.0, pytest.approx(6 / 7), -1.5)
