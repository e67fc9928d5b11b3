"""Slide-level metrics (numpy only): AUC, accuracy, balanced accuracy, F1.

``probs`` is (N, C) class probabilities, ``labels`` (N,) class indices. AUC is the Mann–Whitney statistic
(ties count one half), computed from average ranks (:func:`average_ranks`, as ``scipy.stats.rankdata``; not
scipy itself, whose import costs 0.6 s of CPU in every short-lived process, e.g. each message a federated site
answers), so that memory is linear in the scores:
a million patches at 5 % tumour would need a 44 GiB positives × negatives matrix the pairwise way. AUC is
binary on column 1, else the macro mean of one-vs-rest AUCs over the classes that
have both positives and negatives. F1 is the positive-class (1) F1 for two classes, macro F1 otherwise.
A metric that cannot be computed (AUC with one class present) is NaN.
"""

from __future__ import annotations

import math

import numpy as np


def format_metric(value: float | None, spec: str = ".3f") -> str:
    """A metric for a report line: "nan" where it could not be computed (None, or NaN such as the AUC of a
    cohort with one class), so every family's report reads the same."""
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return format(value, spec)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-d array; tied values share the mean of their ranks (scipy's rankdata, 'average')."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    first = np.empty(len(values), dtype=bool)
    first[:1] = True
    first[1:] = ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(values))  # a tie group holds sorted positions starts..ends-1
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(first) - 1]
    return ranks


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted as one half.

    The Mann–Whitney U from average ranks: ``(sum of positive ranks − n_pos(n_pos+1)/2) / (n_pos·n_neg)``,
    O(N log N) time and O(N) memory. NaN when either class is absent or a score is NaN."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos_mask = np.asarray(positive, dtype=bool).reshape(-1)
    if s.shape != pos_mask.shape:
        raise ValueError(f"{s.size} scores but {pos_mask.size} labels")
    n_pos = int(pos_mask.sum())
    n_neg = len(s) - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return math.nan
    ranks = average_ranks(s)  # average ranks: a tie between a positive and a negative adds one half
    u = float(ranks[pos_mask].sum()) - n_pos * (n_pos + 1) / 2.0
    return float(u / (float(n_pos) * float(n_neg)))


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probabilities of shape (N, C) and N labels needed, got {p.shape} and {y.shape}")
    return p, y


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
    p, y = _check(probs, labels)
    if p.shape[1] == 2:
        return binary_auc(p[:, 1], y == 1)
    vals = [binary_auc(p[:, k], y == k) for k in range(p.shape[1])]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    pred, y = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
    return float((pred == y).mean()) if len(y) else math.nan


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels``."""
    pred, y = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
    recalls = [float((pred[y == k] == k).mean()) for k in np.unique(y)]
    return float(np.mean(recalls)) if recalls else math.nan


def _f1(pred: np.ndarray, y: np.ndarray, k: int) -> float:
    tp = float(((pred == k) & (y == k)).sum())
    fp = float(((pred == k) & (y != k)).sum())
    fn = float(((pred != k) & (y == k)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1(pred: np.ndarray, labels: np.ndarray, n_classes: int = 2) -> float:
    """Positive-class F1 for two classes, macro F1 (over all ``n_classes``) otherwise."""
    pred, y = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
    if len(y) == 0:
        return math.nan
    if n_classes == 2:
        return _f1(pred, y, 1)
    return float(np.mean([_f1(pred, y, k) for k in range(n_classes)]))


def weighted_f1(pred: np.ndarray, labels: np.ndarray, n_classes: int = 2) -> float:
    """F1 of every class weighted by its share of ``labels`` (scikit-learn's ``average="weighted"``): the
    figure ZoomMIL and other subtyping papers report and select their checkpoints by."""
    pred, y = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
    if len(y) == 0:
        return math.nan
    return float(sum((y == k).mean() * _f1(pred, y, k) for k in range(n_classes)))


def slide_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The slide metrics (and the slide count) from probabilities and labels."""
    p, y = _check(probs, labels)
    pred = p.argmax(1)
    return {"auc": auc(p, y), "accuracy": accuracy(pred, y), "balanced_accuracy": balanced_accuracy(pred, y),
            "f1": f1(pred, y, p.shape[1]), "weighted_f1": weighted_f1(pred, y, p.shape[1]),
            "n_slides": int(len(y))}


__all__ = ["format_metric", "accuracy", "auc", "balanced_accuracy", "binary_auc", "f1", "slide_metrics",
           "weighted_f1"]
