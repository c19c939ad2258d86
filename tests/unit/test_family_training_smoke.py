"""Every trainable family runs network -> finish -> export on a few real images, and evaluate reads the result.

Uses a dozen BUS-BRA images from the development datasets (skipped where
they are absent): one or two optimisation steps, not a model.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.datasets import split_for
from models.errors import TrainingError
from models.training.run_config import RunConfig, member_configs
from tests.training_data import development_datasets, write_busbra_subset

# One epoch of a tiny network on one thread: enough to run every stage of a recipe in seconds.
TINY_RUN = ["--epochs", "1", "--batch-size", "4", "--input-size", "32", "--threads", "1"]

DATASETS = development_datasets()
BUSBRA = DATASETS / "busbra"
pytestmark = pytest.mark.skipif(not (BUSBRA / "labels.csv").is_file(), reason=f"development datasets not at {DATASETS}")


@pytest.fixture(scope="module")
def tiny_busbra(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 real BUS-BRA images chosen so that train and val hold both classes and MUP-Net has prototype candidates."""
    return write_busbra_subset(
        tmp_path_factory.mktemp("datasets"),
        [
            ("train", "benign", ("2", "3"), 4),
            ("train", "malignant", ("5",), 4),
            ("val", "benign", ("2", "3"), 2),
            ("val", "malignant", ("4", "5"), 2),
            ("test", "benign", ("2", "3", "4"), 2),
            ("test", "malignant", ("4", "5"), 2),
        ],
    )


@pytest.mark.parametrize("family", ["dl_u", "cldlr", "dlr_lh", "mupnet"])
def test_family_trains_finishes_exports_and_evaluates(family: str, tiny_busbra: Path, tmp_path: Path) -> None:
    from models.evaluation.command import evaluate
    from models.inference.registry import read_manifest, verified_path
    from models.training import train_family

    models = tmp_path / "models"
    train_family.main(
        [
            family,
            "--datasets",
            str(tiny_busbra),
            "--work",
            str(tmp_path / "work"),
            "--output",
            str(models),
            *TINY_RUN,
        ]
    )
    log = [json.loads(line) for line in (tmp_path / "work" / "train.log").read_text().splitlines()]
    assert log[0]["epoch"] == 0 and 0.0 <= log[0]["val_auc"] <= 1.0
    entry = read_manifest(models)[family]
    verified_path(entry, models)
    assert entry.parameters["family"] == family and 0.0 <= entry.parameters["operating_point"] <= 1.0
    assert entry.version == train_family.FAMILIES[family].version  # the recipe's release, not one counter for all
    assert entry.parameters["max_abs_diff_fp32"] < 1e-3
    if family == "cldlr":
        assert set(entry.parameters["side_files"]) == {"clinical", "dlr", "cldlr"}
    if family == "mupnet":
        prototypes = json.loads((models / "mupnet_prototypes.json").read_text())
        assert len(prototypes) == 10 and all(p["source_id"].startswith("busbra/") for p in prototypes)
        import numpy as np

        from models.inference.family_scorer import load_family_scorer

        score = load_family_scorer(entry, models).score(np.full((120, 160), 100, np.uint8), (40, 30, 50, 40))
        assert len(score.prototypes) == 3 and score.prototypes[0].patch.shape == (64, 64)
        assert {p.source for p in score.prototypes} <= {p["source_id"] for p in prototypes}
        # Four training images per class for five prototypes per class: every image serves before any serves twice.
        train = train_family.split_samples(train_family.FAMILIES["mupnet"], tiny_busbra)["train"]
        assert {p["source_id"] for p in prototypes} == {f"{s.record.dataset}/{s.record.image_id}" for s in train}
        # The paper's stages ran as many times as the recipe says, and the export names the cycle it kept.
        finish = json.loads((tmp_path / "work" / "finish.json").read_text())
        spec = train_family.FAMILIES["mupnet"]
        assert len(finish["cycles"]) == spec.push_cycles == entry.parameters["training"]["push_cycles"] > 1
        assert entry.parameters["training"]["chosen_cycle"] == finish["chosen_cycle"] in range(spec.push_cycles)
        # Served contributions are shares of the malignancy log-odds: they sum to logit(malignant) - logit(benign).
        import onnxruntime as ort

        session = ort.InferenceSession(str(verified_path(entry, models)), providers=["CPUExecutionProvider"])
        dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        for seed in (0, 1):
            pixels = np.random.default_rng(seed).normal(size=(1, 1, 32, 32)).astype(dtype)
            logits, contributions = (
                o.astype(np.float64) for o in session.run(["logits", "contributions"], {"image": pixels})
            )
            assert contributions.shape == (1, 10)
            assert contributions.sum() == pytest.approx(logits[0, 1] - logits[0, 0], abs=2e-2)
    report = evaluate(tiny_busbra, models, [family], "all", tmp_path / "evaluation", resamples=50)
    overall = report["families"][family]["classification"]["all"]
    assert overall["n"] == 16 and overall["n_positive"] == (8 if family != "dlr_lh" else 10)
    assert (tmp_path / "evaluation" / f"roc_{entry.parameters['task']}.png").stat().st_size > 1000


def test_the_opt_in_lh_consensus_trains_fits_and_evaluates(tiny_busbra: Path, tmp_path: Path) -> None:
    """make train-lh-consensus on a few images: dl_u_lh (two seeds, one graph) beside DLR_LH, their consensus fitted
    and evaluated.
    """
    from models.evaluation.command import evaluate
    from models.inference.registry import read_manifest, verified_path
    from models.training import train_family
    from models.training.fit_consensus import fit_consensus

    models = tmp_path / "models"
    for family in ("dlr_lh", "dl_u_lh", "dlr_bm"):
        train_family.main(
            [
                family,
                "--datasets",
                str(tiny_busbra),
                "--work",
                str(tmp_path / family),
                "--output",
                str(models),
                *TINY_RUN,
            ]
        )
    members = read_manifest(models)["dl_u_lh"].parameters["training"]["ensemble"]
    assert members["members"] == 2 and members["seeds"] == [20261121, 20261122]
    assert all((tmp_path / "dl_u_lh" / f"member-{k}" / "best.pt").is_file() for k in (0, 1))
    entry = fit_consensus(tiny_busbra, models, task="birads_high")
    assert (
        entry.role == "consensus_lh"
        and entry.parameters["task"] == "birads_high"
        and entry.parameters["members"] == ["dlr_lh", "dl_u_lh"]
    )
    verified_path(entry, models)
    assert json.loads((models / "manifest.json").read_text())["default_pipelines"]["US"][0] == "consensus_lh"
    with pytest.raises(TrainingError, match="not an ultrasound model of the malignancy task"):
        fit_consensus(tiny_busbra, models, ("dlr_lh", "dl_u_lh"))
    report = evaluate(
        tiny_busbra,
        models,
        ["consensus_lh", "dlr_lh", "dl_u_lh", "dlr_bm"],
        "all",
        tmp_path / "evaluation",
        resamples=50,
    )
    assert report["families"]["consensus_lh"]["classification"]["all"]["n"] == 16
    assert report["families"]["consensus_lh"]["task"] == "birads_high"
    assert report["four_a_lh_model"] == "consensus_lh"  # the tally read the LH consensus, not DLR_LH alone
    assert (
        evaluate(tiny_busbra, models, ["dlr_lh", "dlr_bm"], "all", tmp_path / "without", resamples=50)[
            "four_a_lh_model"
        ]
        == "dlr_lh"
    )


def test_roi_padding_override_reaches_training_and_the_served_entry(tiny_busbra: Path, tmp_path: Path) -> None:
    from models.inference.registry import read_manifest
    from models.training import train_family

    spec = train_family.FAMILIES["dlr_bm"]
    wider = train_family.with_roi_padding(spec, 0.5)
    assert train_family.with_roi_padding(spec, None) is spec and spec.roi.padding == 0.2
    # A 100x50 box grown by half of each side on every side, inside a large image.
    assert wider.roi.box((200, 200, 100, 50), (1000, 1000)) == (150, 175, 200, 100)
    with pytest.raises(TrainingError, match="outside"):
        train_family.with_roi_padding(spec, -0.1)
    models = tmp_path / "models"
    train_family.main(
        [
            "dl_u",
            "--datasets",
            str(tiny_busbra),
            "--work",
            str(tmp_path / "work"),
            "--output",
            str(models),
            *TINY_RUN,
            "--roi-padding",
            "0.45",
        ]
    )
    assert json.loads((tmp_path / "work" / "config.json").read_text())["roi_padding"] == 0.45
    parameters = read_manifest(models)["dl_u"].parameters
    # DL-U keeps its own rule (a fraction of the shortest side); only the fraction changes, and serving reads it.
    assert (parameters["roi_expand"], parameters["roi_expand_shortest_side"]) == (0.45, True)
    from models.evaluation.cards import card_markdown

    card = card_markdown(read_manifest(models)["dl_u"], {}, None, str(tiny_busbra))
    assert "ROI as served: the lesion box grown by 45% of its shortest side on every side." in card


def test_seed_ensemble_trains_each_member_and_serves_their_mean(tiny_busbra: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    from models.evaluation.cards import card_markdown
    from models.inference.registry import read_manifest
    from models.training import train_family
    from models.training.export_family import serving_wrapper

    work, models = tmp_path / "work", tmp_path / "models"
    arguments = [
        "--datasets",
        str(tiny_busbra),
        "--work",
        str(work),
        "--output",
        str(models),
        *TINY_RUN,
        "--seed",
        "7",
    ]
    train_family.main(["dl_u", "--ensemble", "2", *arguments])
    members = [json.loads((work / f"member-{k}" / "config.json").read_text()) for k in range(2)]
    assert [m["seed"] for m in members] == [7, 8] and all(
        (work / f"member-{k}" / "best.pt").is_file() for k in range(2)
    )
    first, second = (torch.load(work / f"member-{k}" / "best.pt", weights_only=False)["model"] for k in range(2))
    assert any(not torch.equal(first[name], second[name]) for name in first)  # different seeds, different networks
    entry = read_manifest(models)["dl_u"]
    ensemble = entry.parameters["training"]["ensemble"]
    assert ensemble["members"] == 2 and ensemble["seeds"] == [7, 8] and len(ensemble["member_val_auc"]) == 2
    assert 0.0 <= entry.parameters["training"]["val_auc_as_served"] <= 1.0
    # The served graph is the members' mean: its logit equals the mean of each member's own logit.
    config = RunConfig(
        part="dl_u",
        family="dl_u",
        datasets=str(tiny_busbra),
        work=str(work),
        holdout="",
        epochs=1,
        batch_size=4,
        learning_rate=1e-3,
        input_size=32,
        seed=7,
        threads=1,
        max_minutes=float("inf"),
        bf16=False,
        ensemble=2,
    )
    spec = train_family.FAMILIES["dl_u"]
    image = np.random.default_rng(0).normal(size=(1, 1, 32, 32)).astype(np.float32)
    singles = [serving_wrapper(spec, member)[0].eval() for member in member_configs(config)]
    with torch.no_grad():
        expected = float(np.mean([single(torch.from_numpy(image))[0].item() for single in singles]))
    session = ort.InferenceSession(str(models / entry.file), providers=["CPUExecutionProvider"])
    feed = image.astype(np.float16) if session.get_inputs()[0].type == "tensor(float16)" else image
    served = float(session.run(["logit"], {"image": feed})[0].reshape(-1)[0])
    assert abs(served - expected) < 0.05
    card = card_markdown(entry, {}, None, str(tiny_busbra))
    assert (
        "seed ensemble of 2 networks" in card
        and "seed 8 (epoch 0" in card
        and "from 2 seeds; the paper trains one" in card
    )
    # CLDLR's SVMs belong to one network: refused before any training
    with pytest.raises(TrainingError, match="cldlr cannot be a seed ensemble"):
        train_family.main(["cldlr", "--ensemble", "2", *arguments])


def test_dlr_seed_ensemble_fits_each_members_age_mlp(tiny_busbra: Path, tmp_path: Path) -> None:
    from models.inference.registry import read_manifest
    from models.training import train_family

    work, models = tmp_path / "work", tmp_path / "models"
    train_family.main(
        [
            "dlr_bm",
            "--ensemble",
            "2",
            "--datasets",
            str(tiny_busbra),
            "--work",
            str(work),
            "--output",
            str(models),
            *TINY_RUN,
        ]
    )
    # The paper's MLP over [embedding, age] is fitted on each member's own embedding.
    assert all(
        (work / f"member-{k}" / "mlp.pt").is_file() and (work / f"member-{k}" / "finish.json").is_file()
        for k in range(2)
    )
    entry = read_manifest(models)["dlr_bm"]
    assert entry.parameters["training"]["ensemble"]["members"] == 2
    assert entry.parameters["inputs"] == ["image", "clinical"] and entry.parameters["outputs"] == [
        "logits",
        "image_logits",
        "cam",
    ]


def test_compressing_a_bundled_graph_checks_it_on_validation_lesions(tiny_busbra: Path, tmp_path: Path) -> None:
    from models.evaluation.cards import card_markdown
    from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest, sha256_of, write_manifest
    from models.training.compress_weights import CompressionRefused, compress_family

    # The bundled DL-U is stored in float16 (the DLR graphs already went through this tool).
    entry = read_manifest(BUNDLED_MODEL_DIR)["dl_u"]
    assert not (entry.parameters.get("weight_storage") or {}).get("accepted")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(BUNDLED_MODEL_DIR / entry.file, models)
    write_manifest({"dl_u": entry}, models)
    before = (models / entry.file).stat().st_size
    updated = compress_family("dl_u", models, tiny_busbra)
    storage = updated.parameters["weight_storage"]
    assert storage["accepted"] and storage["weights_stored_int8"] >= 10 and storage["validation_lesions"] == 4
    assert (models / entry.file).stat().st_size < 0.7 * before
    assert (
        updated.sha256 == sha256_of(models / entry.file) != entry.sha256 and updated.version == f"{entry.version}+int8"
    )
    assert json.loads((models / "manifest.json").read_text())["models"]["dl_u"]["sha256"] == updated.sha256
    assert "convolution weights stored as int8" in card_markdown(updated, {}, None, str(tiny_busbra))
    assert not list(models.glob("*.int8-candidate"))
    with pytest.raises(CompressionRefused, match="already"):
        compress_family("dl_u", models, tiny_busbra)
    # CLDLR's served score is its SVM's, not the graph's first output, so the tool cannot check it.
    cldlr = read_manifest(BUNDLED_MODEL_DIR)["cldlr"]
    write_manifest({"cldlr": cldlr}, models)
    with pytest.raises(CompressionRefused, match="SVM"):
        compress_family("cldlr", models, tiny_busbra)


def test_compressing_refuses_a_graph_an_export_replaced_meanwhile(
    tiny_busbra: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    import models.training.compress_weights as compress_weights
    from models.inference.registry import (
        BUNDLED_MODEL_DIR,
        merge_into_manifest,
        read_manifest,
        sha256_of,
        write_manifest,
    )

    entry = read_manifest(BUNDLED_MODEL_DIR)["dl_u"]
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(BUNDLED_MODEL_DIR / entry.file, models)
    write_manifest({"dl_u": entry}, models)
    newer = (models / entry.file).read_bytes() + b"\n"  # stands in for a retrained network's graph
    checked = compress_weights.int8_storage

    def export_lands_during_the_check(*args: object, **kwargs: object) -> dict[str, object]:
        # What a concurrent `breastai train dl_u` export does: new file, then its manifest entry.
        (models / entry.file).write_bytes(newer)
        merge_into_manifest(
            models, {"dl_u": dataclasses.replace(entry, version="9.9.9", sha256=sha256_of(models / entry.file))}
        )
        return checked(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(compress_weights, "int8_storage", export_lands_during_the_check)
    with pytest.raises(compress_weights.CompressionRefused, match="replaced while"):
        compress_weights.compress_family("dl_u", models, tiny_busbra)
    assert (models / entry.file).read_bytes() == newer
    assert read_manifest(models)["dl_u"].version == "9.9.9"
    assert not list(models.glob("*.int8-candidate"))


def test_lexicon_model_fits_on_served_outlines_and_is_evaluated(tiny_busbra: Path, tmp_path: Path) -> None:
    from models.evaluation.command import evaluate
    from models.inference.pipeline import SEGMENTATION_ROLES
    from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest, write_manifest
    from models.training.fit_lexicon import fit_lexicon

    bundled = read_manifest(BUNDLED_MODEL_DIR)
    models = tmp_path / "models"
    models.mkdir()
    stages = {role: bundled[role] for role in SEGMENTATION_ROLES if role in bundled}
    for entry in stages.values():
        shutil.copy(BUNDLED_MODEL_DIR / entry.file, models)
    write_manifest(dict(stages), models)
    entry = fit_lexicon(tiny_busbra, models)
    assert entry.role == "lexicon" and entry.parameters["segmentation"] == {
        role: e.sha256 for role, e in stages.items()
    }
    assert entry.parameters["fitted"]["train_cases"] == 8 and 0.0 <= entry.parameters["operating_point"] <= 1.0
    report = evaluate(tiny_busbra, models, ["lexicon"], "all", tmp_path / "evaluation", resamples=50)
    assert report["families"]["lexicon"]["classification"]["all"]["n"] == 16


def test_mask_pretraining_starts_a_family_and_the_export_says_so(tiny_busbra: Path, tmp_path: Path) -> None:
    import torch

    from models.inference.registry import read_manifest, sha256_of
    from models.training import mask_pretraining, train_family

    work = tmp_path / "pretrain-masks"
    mask_pretraining.main(
        [
            "dlr_bm",
            "--datasets",
            str(tiny_busbra),
            "--work",
            str(work),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--input-size",
            "32",
            "--threads",
            "1",
        ]
    )
    log = [json.loads(line) for line in (work / "train.log").read_text().splitlines()]
    assert [entry["part"] for entry in log] == ["pretrain-masks-dlr_bm"] * 2
    assert all(0.0 <= entry["val_dice"] <= 1.0 and np.isfinite(entry["loss"]) for entry in log)
    assert json.loads((work / "config.json").read_text())["objective"] == "masks"
    pretrained = torch.load(work / "best.pt", map_location="cpu", weights_only=False)["model"]
    assert set(pretrained) == set(
        train_family.FAMILIES["dlr_bm"].build().state_dict()
    )  # the decoder is not part of the network
    decoder = torch.load(work / "last.pt", map_location="cpu", weights_only=False)["companions"]["decoder"]
    assert decoder and not set(decoder) & set(pretrained)  # kept for resuming, in the same file as the network's epoch

    # Resuming after the last epoch trains nothing more and keeps the log as it was.
    mask_pretraining.main(
        [
            "dlr_bm",
            "--datasets",
            str(tiny_busbra),
            "--work",
            str(work),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--input-size",
            "32",
            "--threads",
            "1",
        ]
    )
    assert len((work / "train.log").read_text().splitlines()) == 2

    models = tmp_path / "models"
    train_family.main(
        [
            "dlr_bm",
            "--datasets",
            str(tiny_busbra),
            "--work",
            str(tmp_path / "work"),
            "--output",
            str(models),
            *TINY_RUN,
            "--init",
            str(work / "best.pt"),
        ]
    )
    initialisation = read_manifest(models)["dlr_bm"].parameters["training"]["initialisation"]
    assert (
        initialisation.startswith("mask pretraining of this network") and sha256_of(work / "best.pt") in initialisation
    )
    # The same folder cannot then be resumed from random weights: its export would call the pretrained weights random.
    with pytest.raises(TrainingError, match=r"init: .* -> ''"):
        train_family.main(
            [
                "dlr_bm",
                "--datasets",
                str(tiny_busbra),
                "--work",
                str(tmp_path / "work"),
                "--output",
                str(models),
                *TINY_RUN,
            ]
        )
    # Nor a pretraining under another seed (the first ran under the recipe's, DLR_BM's shipped seed).
    with pytest.raises(TrainingError, match=f"seed: {train_family.FAMILIES['dlr_bm'].seed} -> 5"):
        mask_pretraining.main(["dlr_bm", "--datasets", str(tiny_busbra), "--work", str(work), "--seed", "5"])
    from models.evaluation.cards import card_markdown

    card = card_markdown(read_manifest(models)["dlr_bm"], {}, None, str(tiny_busbra))
    assert "**Initialisation:** mask pretraining of this network" in card


def test_mask_pretrained_mupnet_checkpoint_starts_its_trunk(tiny_busbra: Path, tmp_path: Path) -> None:
    import torch

    from models.training import mask_pretraining, train_family

    work = tmp_path / "pretrain-masks"
    mask_pretraining.main(
        [
            "mupnet",
            "--datasets",
            str(tiny_busbra),
            "--work",
            str(work),
            *TINY_RUN,
        ]
    )
    pretrained = torch.load(work / "best.pt", map_location="cpu", weights_only=False)["model"]
    model = train_family.FAMILIES["mupnet"].build()
    fresh = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    train_family.load_initial_weights(model, work / "best.pt")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], pretrained[name]) for name in loaded)
    assert not torch.equal(
        loaded["trunks.0.stem.0.weight"], fresh["trunks.0.stem.0.weight"]
    )  # the trunk did learn the outlines


def test_external_validation_trains_without_the_held_out_set_and_scores_all_of_it(
    tiny_busbra: Path, tmp_path: Path
) -> None:
    from models.inference.registry import read_manifest
    from models.training.external import main as external_main

    root = tmp_path / "datasets"
    shutil.copytree(tiny_busbra / "busbra", root / "busbra")
    with (DATASETS / "busi" / "labels.csv").open(newline="") as handle:
        busi_rows = list(csv.DictReader(handle))
    chosen = [
        row
        for split, count in (("train", 4), ("val", 2))
        for label in ("benign", "malignant")
        for row in [r for r in busi_rows if r["label"] == label and split_for("busi", r["id"], r) == split][:count]
    ]
    (root / "busi" / "images").mkdir(parents=True)
    (root / "busi" / "masks").mkdir()
    for row in chosen:
        shutil.copy(DATASETS / "busi" / "images" / f"{row['id']}.png", root / "busi" / "images")
        shutil.copy(DATASETS / "busi" / "masks" / f"{row['id']}.png", root / "busi" / "masks")
    with (root / "busi" / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(busi_rows[0]))
        writer.writeheader()
        writer.writerows(chosen)

    from models.training.pretrain import pretraining_images

    assert (
        len(pretraining_images(root)) == 16 and len(pretraining_images(root, holdout="busbra")) == 8
    )  # busi's 8 training images

    work, cards = tmp_path / "external", tmp_path / "cards"
    external_main(
        [
            "--holdout",
            "busbra",
            "--datasets",
            str(root),
            "--families",
            "dl_u,cldlr",
            "--work",
            str(work),
            "--cards",
            str(cards),
            "--resamples",
            "20",
            *TINY_RUN,
            "--pretrain-epochs",
            "1",
        ]
    )
    # CLDLR's reference recipe starts from mask pretraining, so its external run does too, without busbra; DL-U's does
    # not.
    pretraining = json.loads((work / "pretrain-masks-cldlr" / "config.json").read_text())
    assert pretraining["holdout"] == "busbra" and pretraining["objective"] == "masks" and pretraining["epochs"] == 1
    assert pretraining["input_size"] == 32 and pretraining["threads"] == 1
    assert not (work / "pretrain-masks-dl_u").exists()
    entries = read_manifest(work / "weights")
    assert entries["cldlr"].parameters["training"]["initialisation"].startswith("mask pretraining of this network")
    assert "without any image of busbra" in entries["cldlr"].parameters["training"]["initialisation"]
    assert entries["dl_u"].parameters["training"]["initialisation"].startswith("random")
    for family in ("dl_u", "cldlr"):
        training = entries[family].parameters["training"]
        assert training["datasets"] == ["busi"] and training["cases"]["train"] == 8 and training["cases"]["val"] == 4
        assert entries[family].parameters["trained_without"] == "busbra"
    fitted = entries["consensus"].parameters["fitted"]
    assert fitted["datasets"] == ["busi"] and fitted["cases"] == 4 and fitted["trained_without"] == "busbra"
    report = json.loads((work / "evaluation" / "report.json").read_text())
    assert report["split"] == "all" and set(report["families"]) == {"consensus", "dl_u", "cldlr", "birads_reader"}
    assert all(
        body["classification"]["all"]["n"] == 16 for body in report["families"].values()
    )  # every busbra image, test fold included
    card = (cards / "without_busbra.md").read_text()
    assert card.startswith("# External validation: trained without busbra") and entries["consensus"].sha256 in card
    assert "`dl_u`: trained on 8 lesions (4 malignant) of busi; 4 for validation (2 malignant)" in card
    assert "of 1. Started from mask pretraining of this network, 1 epoch, without any image of `busbra`." in card
    assert "## birads_reader" in card and "Not a model" in card  # the radiologists' categories of the same lesions
