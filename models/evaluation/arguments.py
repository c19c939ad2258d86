"""The flags of ``breastai evaluate``, apart from the command: building the CLI parser loads no evaluation code.

``workers.cli`` builds every sub-command's parser on each start, ``serve``
included; :mod:`models.evaluation.command` is imported only when
``evaluate`` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.inference.registry import BUNDLED_MODEL_DIR


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` flags to ``parser`` (read by :func:`models.evaluation.command.run_evaluate`)."""
    parser.add_argument("data", type=Path, help="a folder laid out like shared/datasets (or one dataset folder of it)")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=BUNDLED_MODEL_DIR,
        help="models and manifest.json (default: the bundled reference models)",
    )
    parser.add_argument(
        "--families",
        default="",
        help="comma-separated manifest roles (default: every classification model in the manifest)",
    )
    parser.add_argument(
        "--split",
        choices=("test", "val", "train", "all"),
        default="test",
        help="which split of the data to score (all: a site's own data)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("var/evaluation"),
        help="folder for report.json, report.md, predictions.csv and PNGs",
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument(
        "--served-only",
        action="store_true",
        help="judge only the served B-mode pipeline (segmenter-found lesions, headline score) and merge it into the "
        "report.json already in --output, keeping the rest of it",
    )
    parser.add_argument(
        "--cards",
        type=Path,
        default=None,
        help="also write a model card per family into this folder (e.g. models/cards)",
    )
