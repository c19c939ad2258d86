"""A fitted RBF support vector machine with Platt scaling, scored in plain numpy.

CLDLR's "AI score" is an SVM probability. Training uses scikit-learn
(:func:`models.training.train_family`); serving must not need it, so the
fitted machine is stored as arrays (``.npz``) and scored here:

``f(x) = sum_i a_i exp(-gamma ||s_i - x||^2) + b`` on standardised
features, then ``p = 1 / (1 + exp(A f + B))`` (Platt 1999), with A, B
fitted on validation decision values rather than libsvm's internal
cross-validation so that the stored model is exactly what was evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SvmModel:
    """Everything needed to score: scaler, support vectors, dual coefficients, Platt parameters."""

    mean: FloatArray
    scale: FloatArray
    support_vectors: FloatArray
    dual_coefficients: FloatArray
    intercept: float
    gamma: float
    platt_a: float
    platt_b: float

    def decision(self, features: npt.ArrayLike) -> FloatArray:
        """Signed distance-like SVM output; positive favours class 1 (malignant)."""
        x = (np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean) / self.scale
        squared = (x**2).sum(1)[:, None] + (self.support_vectors**2).sum(1)[None, :] - 2.0 * x @ self.support_vectors.T
        kernel = np.exp(-self.gamma * np.maximum(squared, 0.0))
        result: FloatArray = kernel @ self.dual_coefficients + self.intercept
        return result

    def probability(self, features: npt.ArrayLike) -> FloatArray:
        """Platt-scaled probability of class 1."""
        result: FloatArray = 1.0 / (1.0 + np.exp(self.platt_a * self.decision(features) + self.platt_b))
        return result

    def save(self, path: Path) -> None:
        np.savez(
            path,
            mean=self.mean,
            scale=self.scale,
            support_vectors=self.support_vectors.astype(np.float32),
            dual_coefficients=self.dual_coefficients,
            scalars=np.array([self.intercept, self.gamma, self.platt_a, self.platt_b]),
        )

    @classmethod
    def load(cls, path: Path) -> SvmModel:
        with np.load(path) as data:
            intercept, gamma, platt_a, platt_b = (float(v) for v in data["scalars"])
            return cls(
                mean=data["mean"].astype(np.float64),
                scale=data["scale"].astype(np.float64),
                support_vectors=data["support_vectors"].astype(np.float64),
                dual_coefficients=data["dual_coefficients"].astype(np.float64),
                intercept=intercept,
                gamma=gamma,
                platt_a=platt_a,
                platt_b=platt_b,
            )


def fit_platt(decision_values: npt.ArrayLike, labels: npt.ArrayLike, iterations: int = 200) -> tuple[float, float]:
    """Fit Platt's sigmoid ``1 / (1 + exp(A f + B))`` by Newton's method with his smoothed targets."""
    f = np.asarray(decision_values, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
    target = np.where(y == 1, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))
    a, b = 0.0, float(np.log((negatives + 1.0) / (positives + 1.0)))
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(a * f + b))
        # gradient and Hessian of the cross-entropy in (A, B)
        d = target - p
        gradient = np.array([(d * f).sum(), d.sum()])
        w = p * (1 - p)
        hessian = np.array([[(w * f * f).sum(), (w * f).sum()], [(w * f).sum(), w.sum()]]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(a), float(b)
