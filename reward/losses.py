"""Training losses and agreement metrics for reward perspectives: Bradley-Terry on pairs, binary
classification on labels, pairwise accuracy under an explicit tie policy, classification accuracy/F1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

TIE_POLICIES = ("drop", "half", "predict_ties")

# one value per example, as a tensor or anything torch.as_tensor takes (lists, numpy arrays)
TensorLike = Tensor | Sequence[float]


def _rewards(values: TensorLike, name: str, metric: bool = False) -> Tensor:
    """A 1-D float tensor: float32 at least for losses (rewards ~1e-3 apart vanish in half precision),
    float64 for metrics; metrics are also detached."""
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per example), got shape {tuple(tensor.shape)}")
    if metric:
        return tensor.detach().to(torch.float64)
    if not tensor.is_floating_point() or torch.finfo(tensor.dtype).bits < 32:
        tensor = tensor.float()
    return tensor


def _same_length(first: Tensor, second: Tensor, names: str) -> None:
    if first.shape != second.shape:
        raise ValueError(f"{names} must have the same length, got {first.numel()} and {second.numel()}")


def _binary(labels: TensorLike, name: str, like: Tensor) -> Tensor:
    tensor = torch.as_tensor(labels, device=like.device)
    _same_length(like, tensor, f"scores and {name}")
    if not torch.all((tensor == 0) | (tensor == 1)):
        raise ValueError(f"{name} must hold only 0/1 (or False/True)")
    return tensor.bool()


def bradley_terry_loss(
    r_chosen: TensorLike,
    r_rejected: TensorLike,
    tau: float = 0.1,
    margin: float | TensorLike = 0.0,
    ties: TensorLike | None = None,
) -> Tensor:
    """Bradley-Terry loss: mean over pairs of `-log sigmoid((r_chosen - r_rejected - margin) / tau)`.

    `margin` (a number, or one value per pair) is in reward units and is subtracted from the reward gap
    before the temperature, so the loss keeps pushing until chosen beats rejected by more than the margin
    (as TRL's RewardTrainer applies its `margin` column). `tau` is the temperature (the LLaVA-Reward paper
    uses 0.1): a smaller tau sharpens the preference probability `sigmoid(gap / tau)`.

    `ties` (optional, one bool per pair) marks annotator ties: those pairs use the soft target 1/2,
    `-(log sigmoid(gap / tau) + log sigmoid(-gap / tau)) / 2`, without margin, which is smallest at gap 0.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    chosen, rejected = _rewards(r_chosen, "r_chosen"), _rewards(r_rejected, "r_rejected")
    _same_length(chosen, rejected, "r_chosen and r_rejected")
    gap = chosen - rejected
    losses = -F.logsigmoid((gap - torch.as_tensor(margin, dtype=gap.dtype, device=gap.device)) / tau)
    if ties is not None:
        tie_mask = _binary(ties, "ties", gap)
        tie_losses = -(F.logsigmoid(gap / tau) + F.logsigmoid(-gap / tau)) / 2
        losses = torch.where(tie_mask, tie_losses, losses)
    return losses.mean()


def center_penalty(r_chosen: TensorLike, r_rejected: TensorLike | None = None) -> Tensor:
    """The reward-centering term of TRL's `center_rewards_coefficient`: `mean((r_chosen + r_rejected)^2)`.

    With one argument (unpaired rewards) it is `mean(r^2)`. Multiply by the coefficient (TRL suggests 0.01)
    and add to the loss so rewards stay centred on zero and perspectives end up on comparable scales.
    """
    total = _rewards(r_chosen, "r_chosen")
    if r_rejected is not None:
        rejected = _rewards(r_rejected, "r_rejected")
        _same_length(total, rejected, "r_chosen and r_rejected")
        total = total + rejected
    return (total**2).mean()


def classification_loss(logits: TensorLike, labels: TensorLike) -> Tensor:
    """Binary cross-entropy on logits for unpaired labels (1 = positive, e.g. safe; 0 = negative)."""
    scores = _rewards(logits, "logits")
    targets = _binary(labels, "labels", scores).to(scores.dtype)
    return F.binary_cross_entropy_with_logits(scores, targets)


def pairwise_accuracy(
    r_chosen: TensorLike,
    r_rejected: TensorLike,
    tie_labels: TensorLike | None = None,
    policy: str = "drop",
    eps: float | None = None,
    tau: float = 0.1,
) -> dict[str, Any]:
    """How often the reward orders a pair the way annotators did, under an explicit tie policy.

    `tie_labels` (one bool per pair; default none) marks pairs the annotators judged equal.
    Policies:
      - "drop": ground-truth ties are left out; a pair scores 1 if r_chosen > r_rejected, 0 if below,
        1/2 if exactly equal (a constant reward scores chance, not zero).
      - "half": every pair counts; decided pairs score as in "drop", each ground-truth tie scores 1/2.
      - "predict_ties": the model predicts a tie when |sigmoid((r_chosen - r_rejected) / tau) - 1/2| <= eps;
        a tie pair is right when a tie is predicted, a decided pair when no tie is predicted and
        r_chosen > r_rejected. Pick `eps` on a separate split with `choose_tie_eps`.

    Returns a dict: "accuracy", "tie_policy", "num_pairs" (pairs scored), "num_ties" (ground-truth ties in
    the input), and for "predict_ties" also "eps" and "tau".
    """
    if policy not in TIE_POLICIES:
        raise ValueError(f"policy must be one of {TIE_POLICIES}, got {policy!r}")
    chosen, rejected = _rewards(r_chosen, "r_chosen", True), _rewards(r_rejected, "r_rejected", True)
    _same_length(chosen, rejected, "r_chosen and r_rejected")
    if tie_labels is None:
        ties = torch.zeros_like(chosen, dtype=torch.bool)
    else:
        ties = _binary(tie_labels, "tie_labels", chosen)
    if chosen.numel() == 0:
        raise ValueError("pairwise_accuracy needs at least one pair")
    gap = chosen - rejected
    result: dict[str, Any] = {"tie_policy": policy, "num_ties": int(ties.sum())}
    if policy == "predict_ties":
        if eps is None or not 0 <= eps <= 0.5:
            raise ValueError(f"policy 'predict_ties' needs eps in [0, 0.5], got {eps!r}")
        predicted_tie = _tie_gap(gap, tau) <= eps
        correct = torch.where(ties, predicted_tie, ~predicted_tie & (gap > 0))
        accuracy = correct.double().mean().item()
        return {"accuracy": accuracy, **result, "num_pairs": gap.numel(), "eps": eps, "tau": tau}
    order_score = (gap > 0).double() + 0.5 * (gap == 0).double()
    if policy == "drop":
        if bool(ties.all()):
            raise ValueError("every pair is a tie: policy 'drop' leaves nothing to score; use 'half' or 'predict_ties'")
        scores = order_score[~ties]
    else:
        scores = torch.where(ties, torch.full_like(order_score, 0.5), order_score)
    return {"accuracy": scores.mean().item(), **result, "num_pairs": scores.numel()}


def _tie_gap(gap: Tensor, tau: float) -> Tensor:
    """|sigmoid(gap / tau) - 1/2|: how far the preference probability is from a coin flip."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    return (torch.sigmoid(gap / tau) - 0.5).abs()


def choose_tie_eps(
    r_chosen: TensorLike, r_rejected: TensorLike, tie_labels: TensorLike, tau: float = 0.1
) -> dict[str, Any]:
    """The tie threshold `eps` for `pairwise_accuracy(policy="predict_ties")` that maximises accuracy on
    this split (use a split other than the one you report on).

    Exact search in O(n log n): accuracy only changes where eps crosses a pair's |p - 1/2|, so every cut
    between consecutive distinct values is tried; eps is set midway between the two values around the
    best cut (0 when predicting no tie is best), and the smallest such eps wins a tie in accuracy.
    Returns {"eps", "accuracy" (on this split), "tie_policy": "predict_ties", "tau", "num_pairs"}.
    """
    chosen, rejected = _rewards(r_chosen, "r_chosen", True), _rewards(r_rejected, "r_rejected", True)
    _same_length(chosen, rejected, "r_chosen and r_rejected")
    if chosen.numel() == 0:
        raise ValueError("choose_tie_eps needs at least one pair")
    ties = _binary(tie_labels, "tie_labels", chosen)
    gap = chosen - rejected
    sorted_gaps, order = torch.sort(_tie_gap(gap, tau))
    sorted_ties, sorted_right = ties[order].double(), (~ties & (gap > 0))[order].double()
    zero = torch.zeros(1, dtype=torch.float64)
    # cut k: the k pairs with the smallest |p - 1/2| are predicted ties, the rest are not
    ties_found = torch.cat([zero, sorted_ties.cumsum(0)])
    decided_right_in_ties = torch.cat([zero, sorted_right.cumsum(0)])
    correct = ties_found + sorted_right.sum() - decided_right_in_ties
    # a cut must fall between distinct values, and cut 0 needs every |p - 1/2| > 0 (eps = 0 catches zeros)
    n = gap.numel()
    allowed = torch.ones(n + 1, dtype=torch.bool)
    allowed[1:n] = sorted_gaps[1:] > sorted_gaps[:-1]
    allowed[0] = bool(sorted_gaps[0] > 0)
    best = int(torch.argmax(torch.where(allowed, correct, torch.full_like(correct, -1.0))))
    if best == 0:
        eps = 0.0
    elif best == n:
        eps = float(sorted_gaps[-1])
    else:
        eps = float((sorted_gaps[best - 1] + sorted_gaps[best]) / 2)
    return {"eps": eps, "accuracy": float(correct[best]) / n, "tie_policy": "predict_ties", "tau": tau, "num_pairs": n}


def classification_metrics(logits: TensorLike, labels: TensorLike, threshold: float = 0.0) -> dict[str, Any]:
    """Accuracy, precision, recall and F1 of binary predictions `logit > threshold` (1 = positive class,
    e.g. safe). Precision, recall or F1 with a zero denominator are reported as 0.

    Returns {"accuracy", "precision", "recall", "f1", "threshold", "positive_label": 1, "num_examples"}.
    """
    scores = _rewards(logits, "logits", True)
    truth = _binary(labels, "labels", scores)
    if scores.numel() == 0:
        raise ValueError("classification_metrics needs at least one example")
    predicted = scores > threshold
    true_pos = int((predicted & truth).sum())
    false_pos = int((predicted & ~truth).sum())
    false_neg = int((~predicted & truth).sum())
    return {
        "accuracy": (predicted == truth).double().mean().item(),
        "precision": true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0,
        "recall": true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0,
        "f1": 2 * true_pos / (2 * true_pos + false_pos + false_neg) if true_pos + false_pos + false_neg else 0.0,
        "threshold": threshold,
        "positive_label": 1,
        "num_examples": scores.numel(),
    }
