"""ROC and reliability plots for model cards (PNG, about 5 x 5 in at 100 dpi).

Figures are drawn with matplotlib's object-oriented API on an Agg canvas and
never through pyplot: no GUI backend is ever selected (the service runs
headless), no global figure registry keeps figures alive, and plotting from
several threads is safe. matplotlib comes with the ``evaluate`` extra (which
the ``train`` extra includes), so it is imported when a plot is drawn, not
when this module is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from models.errors import EvaluationError
from models.evaluation.stats import auc, reliability_curve, roc_curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURE_SIZE_IN = (5.0, 5.0)
DPI = 100

# (labels, scores) of one family or subgroup.
LabelledScores = tuple[npt.ArrayLike, npt.ArrayLike]


def _new_figure() -> tuple[Figure, Axes]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # the serving install has no matplotlib
        raise EvaluationError(
            "plots need matplotlib, which comes with the evaluate extra: pip install 'breastai[evaluate]' "
            "(or make evaluate-venv)"
        ) from error
    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI)
    FigureCanvasAgg(figure)  # attaches itself to the figure: rendering stays off-screen
    axes = figure.add_subplot(1, 1, 1)
    # A small margin keeps points lying on 0 or 1 (e.g. a bin with no positives) visible.
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_aspect("equal")
    axes.grid(True, linewidth=0.5, alpha=0.4)
    return figure, axes


def _save(figure: Figure, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(target, dpi=DPI, format="png")
    return target


def _both_classes(labels: npt.ArrayLike) -> tuple[int, int]:
    y = np.asarray(labels, dtype=np.int64)
    n_positive = int(y.sum())
    return n_positive, int(y.size - n_positive)


def save_roc_png(path: str | Path, curves: Mapping[str, LabelledScores], *, title: str | None = None) -> Path:
    """Save the empirical ROC curves of several models or subgroups to one PNG.

    Parameters
    ----------
    path : str or Path
        Output file (parent folders are created).
    curves : mapping of name to (labels, scores)
        One line per entry, labelled with its AUC and case counts. An entry
        with a single class has no ROC curve; it is listed in the legend as
        such rather than silently dropped.
    title : str, optional

    Returns
    -------
    Path
        The file written.
    """
    figure, axes = _new_figure()
    axes.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", linewidth=1.0, label="chance")
    for name, (labels, scores) in curves.items():
        n_positive, n_negative = _both_classes(labels)
        if not (n_positive and n_negative):
            axes.plot([], [], linestyle="none", label=f"{name}: no ROC (one class, n={n_positive + n_negative})")
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        area = auc(labels, scores)
        axes.plot(fpr, tpr, linewidth=1.5, label=f"{name}: AUC {area:.3f} ({n_positive}+/{n_negative}−)")
    axes.set_xlabel("1 − specificity (false-positive rate)")
    axes.set_ylabel("Sensitivity (true-positive rate)")
    axes.set_title(title or "ROC")
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def save_reliability_png(
    path: str | Path, curves: Mapping[str, LabelledScores], *, bins: int = 10, title: str | None = None
) -> Path:
    """Save reliability (calibration) curves to one PNG.

    Parameters
    ----------
    path : str or Path
        Output file (parent folders are created).
    curves : mapping of name to (labels, probabilities)
        One line per entry through the populated bins only (empty bins have
        no observed frequency), labelled with its expected calibration error.
    bins : int
        Equal-width probability bins.
    title : str, optional

    Returns
    -------
    Path
        The file written.
    """
    figure, axes = _new_figure()
    axes.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", linewidth=1.0, label="perfect calibration")
    for name, (labels, probabilities) in curves.items():
        curve = reliability_curve(labels, probabilities, bins)
        filled = curve.populated
        axes.plot(
            curve.mean_predicted[filled],
            curve.observed_fraction[filled],
            marker="o",
            markersize=4,
            linewidth=1.5,
            label=f"{name}: ECE {curve.expected_calibration_error:.3f} (n={int(curve.counts.sum())})",
        )
    axes.set_xlabel("Mean predicted probability")
    axes.set_ylabel("Observed fraction positive")
    axes.set_title(title or f"Reliability ({bins} bins)")
    axes.legend(loc="upper left", fontsize="small")
    return _save(figure, path)


def save_froc_png(
    path: str | Path,
    false_positives_per_image: npt.ArrayLike,
    sensitivity: npt.ArrayLike,
    marks: Mapping[float, float],
    *,
    title: str | None = None,
    label: str = "finder",
    ylabel: str = "Sensitivity (listed abnormalities found)",
) -> Path:
    """Save a detector's FROC curve (sensitivity against false positives per image) to a PNG.

    Parameters
    ----------
    path : str or Path
        Output file (parent folders are created).
    false_positives_per_image, sensitivity : array_like
        The curve's points, in order of decreasing threshold (a step curve).
    marks : mapping of float to float
        False-positive rates to mark -> the sensitivity read there.
    title : str, optional
    label, ylabel : str
        The curve's legend entry and the y axis's label.

    Returns
    -------
    Path
        The file written.
    """
    figure, axes = _new_figure()
    x = np.asarray(false_positives_per_image, dtype=np.float64)
    y = np.asarray(sensitivity, dtype=np.float64)
    right = max(2.5, float(x.max()) * 1.05 if x.size else 2.5)
    axes.set_xlim(0.0, right)
    axes.set_aspect("auto")
    axes.step(x, y, where="post", linewidth=1.5, label=label)
    for rate, value in marks.items():
        axes.plot([rate], [value], marker="o", markersize=5, linestyle="none", color="black")
        axes.annotate(f"{value:.2f} at {rate:g}", (rate, value), textcoords="offset points", xytext=(4, -12))
    axes.set_xlabel("False positives per image")
    axes.set_ylabel(ylabel)
    axes.set_title(title or "FROC")
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)
