"""A linear probe: does an encoder's feature space separate tumour from the rest?

Why: a MIL model can only find tumour the encoder makes visible. Before a cohort run, an L2
logistic regression on standardised features of labelled tiles measures that in seconds; an
encoder that a linear probe cannot use is not worth hours of extraction. scikit-learn is not a
dependency, so the few pieces are here: stratified folds, standardisation, a class-balanced
L2-regularised logistic regression (L-BFGS from scipy, which scikit-image already needs), balanced
accuracy and a tie-aware ROC AUC.
"""

from __future__ import annotations

import numpy as np

#: Inverse regularisation strength, as scikit-learn's ``LogisticRegression(C=1.0)`` (its default).
DEFAULT_C = 1.0


def stratified_folds(strata: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) of each sample, every stratum spread evenly over the folds."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(strata), np.int64)
    offset = 0
    for s in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == s))
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # the next stratum starts where this one stopped: folds stay the same size
    return fold


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Zero mean, unit variance with the *training* statistics (constant features become 0)."""
    train = np.asarray(train, np.float64)
    mu = train.mean(0)
    sd = train.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    return [(np.asarray(a, np.float64) - mu) / sd for a in (train, *others)]


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = DEFAULT_C, max_iter: int = 500
                 ) -> tuple[np.ndarray, float]:
    """Weights and bias of an L2 logistic regression of binary ``y`` on ``x``, classes balanced.

    Minimises ``C * sum_i w_i log(1 + exp(-s_i z_i)) + |w|^2 / 2`` (the bias is not penalised)
    with ``w_i = n / (2 n_class)``, scikit-learn's ``class_weight="balanced"``: a probe on 10 tumour
    and 60 other tiles must not win by calling everything "other".
    """
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    x = np.asarray(x, np.float64)
    y = np.asarray(y).astype(bool)
    n, d = x.shape
    n_pos = int(y.sum())
    if n_pos in (0, n):
        raise ValueError("a probe needs samples of both classes")
    weight = np.where(y, n / (2.0 * n_pos), n / (2.0 * (n - n_pos)))
    sign = np.where(y, 1.0, -1.0)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d], theta[d]
        z = sign * (x @ w + b)
        loss = c * float(-(weight * log_expit(z)).sum()) + 0.5 * float(w @ w)
        g = -c * weight * sign * expit(-z)  # d loss / d (x w + b)
        return loss, np.concatenate([x.T @ g + w, [g.sum()]])

    res = minimize(objective, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": 1e-6})
    return res.x[:d], float(res.x[d])


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean of the recalls of the two classes: 0.5 is chance, whatever the class sizes."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    return float(0.5 * ((pred[y]).mean() + (~pred[~y]).mean()))


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a positive scores above a negative (ties count half)."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def probe_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float = DEFAULT_C
                 ) -> np.ndarray:
    """Decision values on ``x_test`` of a probe fitted on standardised ``x_train`` (> 0: positive)."""
    tr, te = standardise(x_train, x_test)
    w, b = fit_logistic(tr, y_train, c)
    return te @ w + b


def cross_validated_scores(x: np.ndarray, y: np.ndarray, strata: np.ndarray, k: int, seed: int = 0,
                           c: float = DEFAULT_C) -> np.ndarray:
    """Out-of-fold decision values of every sample, from ``k`` stratified folds."""
    fold = stratified_folds(strata, k, seed)
    out = np.empty(len(y), np.float64)
    for f in range(k):
        test = fold == f
        out[test] = probe_scores(x[~test], y[~test], x[test], c)
    return out


__all__ = ["DEFAULT_C", "balanced_accuracy", "cross_validated_scores", "fit_logistic", "probe_scores",
           "roc_auc", "standardise", "stratified_folds"]
