"""MUP-Net (Yan et al., Commun Med 2024): architecture, loss, the three training stages, contributions, ONNX export."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="MUP-Net needs the train extra (make train-venv)")
pytest.importorskip("monai", reason="MUP-Net needs the train extra (make train-venv)")

from torch import nn

from models.families.mupnet.network import (
    EXPORT_OUTPUT_NAMES,
    LossWeights,
    MUPNet,
    contribution_scores,
    contributions_from,
    evidence_probability,
    export_onnx,
    frozen_evidence,
    iterate_batches,
    joint_optimizer,
    last_layer_optimizer,
    mupnet_loss,
    project_prototypes,
    projection_eligibility,
    prototype_activations,
    receptive_field,
    train_joint_epoch,
    train_last_layer_epoch,
)

SIZE = 64  # 64x64 input -> 2x2 latent with the ResNet-18 stem and four stages
CHANNELS = 16  # small prototype space keeps the CPU tests fast


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _model(modalities: int = 3, prototypes: int = 4, top_k: int = 3) -> MUPNet:
    return MUPNet(modalities=modalities, prototypes_per_modality=prototypes, prototype_channels=CHANNELS, top_k=top_k)


def _batch(count: int, modalities: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(count, modalities, 1, SIZE, SIZE)
    labels = torch.arange(count) % 2
    return images, labels


@pytest.mark.parametrize("modalities", [1, 3])
def test_output_shapes(modalities: int) -> None:
    model = _model(modalities, prototypes=10).eval()
    images, _ = _batch(2, modalities)
    with torch.no_grad():
        out = model(images)
    assert out.logits.shape == (2, 2)
    assert out.similarities.shape == (2, modalities * 10)
    assert out.min_distances.shape == (2, modalities * 10)
    assert out.similarity_maps.shape == (2, modalities * 10, 2, 2)
    assert model.prototypes.shape == (modalities, 10, CHANNELS)
    assert torch.isfinite(out.logits).all()


def test_rejects_wrong_input_layout() -> None:
    model = _model(3)
    with pytest.raises(ValueError, match=r"\(B, 3, 1, H, W\)"):
        model(torch.zeros(2, 1, SIZE, SIZE))


def test_default_hyperparameters_follow_the_paper() -> None:
    model = MUPNet()
    assert model.modalities == 3 and model.prototypes_per_modality == 10 and model.num_classes == 2
    assert len(model.trunks) == 3
    assert model.last_layer.bias is None  # eq. (3) has no bias: contributions sum to the logit
    # Prototypes start uniform in [0, 1), the range of the sigmoid-bounded latent space.
    assert float(model.prototypes.detach().min()) >= 0.0 and float(model.prototypes.detach().max()) < 1.0
    assert isinstance(model.add_ons[0][-1], nn.Sigmoid)


def test_last_layer_initialisation() -> None:
    model = _model(3, prototypes=10)
    weight = model.last_layer.weight.detach()
    assert weight.shape == (2, 30)
    # Per modality: prototypes 0-4 benign (class 0), 5-9 malignant (class 1).
    expected_class = torch.tensor(([0] * 5 + [1] * 5) * 3)
    assert torch.equal(model.prototype_class, expected_class)
    for g in range(30):
        own = int(expected_class[g])
        assert weight[own, g] == 1.0
        assert weight[1 - own, g] == -0.5


def test_odd_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="split evenly"):
        MUPNet(prototypes_per_modality=5)


def test_similarity_decreases_with_distance_and_top_k_averages_the_k_largest() -> None:
    eps = 1e-4
    # One image, one modality, 2 channels, a 2x3 latent map; one prototype at the origin.
    latent = torch.tensor([[0.0, 1.0, 2.0], [0.5, 3.0, 0.1]])
    latent = torch.stack([latent, torch.zeros_like(latent)])[None, None]  # (1, 1, 2, 2, 3)
    prototypes = torch.zeros(1, 1, 2)
    act = prototype_activations(latent, prototypes, top_k=2, epsilon=eps)
    d = torch.tensor([[0.0, 1.0, 4.0], [0.25, 9.0, 0.01]])  # squared distances by hand
    assert torch.allclose(act.distance_maps[0, 0, 0], d)
    sim = torch.log((d + 1) / (d + eps))
    assert torch.allclose(act.similarity_maps[0, 0, 0], sim)
    # The two most similar positions are the two nearest (d = 0 and d = 0.01).
    expected = (math.log(1 / eps) + math.log(1.01 / (0.01 + eps))) / 2
    assert act.similarities[0, 0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert act.min_distances[0, 0, 0].item() == 0.0
    # Monotone: ordering positions by distance orders them inversely by similarity.
    order = torch.argsort(d.flatten())
    assert torch.all(torch.diff(sim.flatten()[order]) < 0)
    grid = torch.linspace(0, 50, 200)
    assert torch.all(torch.diff(torch.log((grid + 1) / (grid + eps))) < 0)
    # k larger than the map averages everything.
    all_positions = prototype_activations(latent, prototypes, top_k=100, epsilon=eps).similarities
    assert all_positions[0, 0, 0].item() == pytest.approx(float(sim.mean()), rel=1e-6)


def test_loss_is_ce_plus_clustering_minus_separation_plus_l1() -> None:
    model = _model(1).eval()
    images, labels = _batch(2, 1)
    with torch.no_grad():
        out = model(images)
        terms = mupnet_loss(model, out, labels)
        weights = LossWeights()
        assert (weights.clustering, weights.separation, weights.l1) == (0.8, 0.08, 1e-4)
        expected = terms.cross_entropy + 0.8 * terms.clustering - 0.08 * terms.separation + 1e-4 * terms.l1
        assert terms.total.item() == pytest.approx(expected.item(), rel=1e-6)
        # Initial L1 covers only the -0.5 other-class weights: 4 prototypes x 1 other class x 0.5.
        assert terms.l1.item() == pytest.approx(2.0)
        # By hand: min over positions and own-class (resp. other-class) prototypes, mean over images.
        own = model.prototype_class[None, :] == labels[:, None]
        clst = torch.where(own, out.min_distances, torch.inf).amin(1).mean()
        sep = torch.where(~own, out.min_distances, torch.inf).amin(1).mean()
        assert terms.clustering.item() == pytest.approx(clst.item())
        assert terms.separation.item() == pytest.approx(sep.item())


def test_moving_a_prototype_onto_an_own_class_patch_lowers_clustering_and_the_loss() -> None:
    model = _model(1).eval()
    images, labels = _batch(1, 1)  # one benign image
    with torch.no_grad():
        before = mupnet_loss(model, model(images), labels)
        patch = model.latent(images)[0, 0, :, 1, 0]
        benign = int(torch.nonzero(model.prototype_class == 0)[0])
        model.prototypes[0, benign] = patch
        after = mupnet_loss(model, model(images), labels)
    assert before.clustering.item() > 0
    assert after.clustering.item() == 0.0
    assert after.separation.item() == pytest.approx(before.separation.item())
    assert after.clustering.item() < before.clustering.item()
    # Positive coefficient on clustering, so the total falls with it.
    assert after.total.item() < before.total.item()


def test_moving_a_prototype_onto_an_other_class_patch_lowers_separation_and_raises_the_loss() -> None:
    model = _model(1).eval()
    images, labels = _batch(1, 1)  # benign
    with torch.no_grad():
        before = mupnet_loss(model, model(images), labels)
        malignant = int(torch.nonzero(model.prototype_class == 1)[0])
        model.prototypes[0, malignant] = model.latent(images)[0, 0, :, 0, 1]
        after = mupnet_loss(model, model(images), labels)
    assert after.separation.item() == 0.0 < before.separation.item()
    assert after.clustering.item() == pytest.approx(before.clustering.item())
    # Separation enters with a minus sign, so losing it raises the loss (CE rises as well: the malignant logit gains).
    assert after.cross_entropy.item() > before.cross_entropy.item()
    assert after.total.item() > before.total.item()


def _latent_all(model: MUPNet, loader: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model.latent(batch[0]) for batch in loader])


def test_projection_puts_every_prototype_on_an_own_class_eligible_patch() -> None:
    model = _model(3, prototypes=4)
    images, labels = _batch(8)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    eligible = torch.ones(8, 3, dtype=torch.bool)
    eligible[0] = False  # benign sample 0 is no candidate in any modality
    eligible[2, 2] = False  # nor sample 2 for elastography
    eligible[1, 0] = False  # malignant sample 1 not for B-mode
    loader = list(iterate_batches(images, labels, 3, eligible))
    record = project_prototypes(model, loader)
    assert model.training  # mode restored
    latent = _latent_all(model, loader)  # same batches as the projection saw
    height, width = latent.shape[-2:]
    prototypes = model.prototypes.detach()
    for m in range(3):
        for j in range(4):
            g = m * 4 + j
            cls = int(record.prototype_class[g])
            index = int(record.source_index[g])
            row, col = (int(v) for v in record.position[g])
            assert int(labels[index]) == cls
            assert bool(eligible[index, m])
            assert torch.equal(prototypes[m, j], latent[index, m, :, row, col])
            assert record.distance[g] >= 0
            y0, x0, y1, x1 = (int(v) for v in record.receptive_field_box[g])
            assert 0 <= y0 < y1 <= SIZE and 0 <= x0 < x1 <= SIZE
            ay0, ax0, ay1, ax1 = (int(v) for v in record.activation_box[g])
            assert 0 <= ay0 < ay1 <= SIZE and 0 <= ax0 < ax1 <= SIZE
            assert 0 <= row < height and 0 <= col < width
            # The nearest own-class eligible patch: no candidate patch is closer than the recorded distance was.
    with torch.no_grad():
        out = model.eval()(images)
        maps = model.activations(model.latent(images)).distance_maps
    for g in range(12):
        m, j = divmod(g, 4)
        index = int(record.source_index[g])
        row, col = (int(v) for v in record.position[g])
        assert maps[index, m, j, row, col].item() == 0.0
        assert out.min_distances[index, g].item() == 0.0
    rows = record.as_dicts()
    assert len(rows) == 12 and rows[5]["modality"] == 1 and rows[5]["image_size"] == [SIZE, SIZE]


def test_projection_picks_the_nearest_candidate() -> None:
    model = _model(1, prototypes=2).eval()
    images, labels = _batch(4, 1)
    loader = list(iterate_batches(images, labels, 2))
    latent = _latent_all(model, loader)
    before = model.prototypes.detach().clone()
    record = project_prototypes(model, loader)
    for j in range(2):
        cls = int(model.prototype_class[j])
        own = latent[labels == cls, 0]  # (n, C, h, w)
        distances = (own - before[0, j][None, :, None, None]).pow(2).sum(1)
        assert record.distance[j].item() == pytest.approx(distances.min().item(), rel=1e-5)


def _two_benign_prototypes_on_image_zero(images: torch.Tensor, labels: torch.Tensor) -> MUPNet:
    """A model whose two benign prototypes both sit on a patch of image 0, so both would project there."""
    model = _model(1, prototypes=4).eval()
    with torch.no_grad():
        patch = model.latent(images[:1])[0, 0, :, 0, 0]
        model.prototypes[0, 0] = patch
        model.prototypes[0, 1] = patch + 1e-3
    return model


def test_projection_gives_each_prototype_its_own_source_image() -> None:
    images, labels = _batch(6, 1)  # benign: 0, 2, 4
    model = _two_benign_prototypes_on_image_zero(images, labels)
    record = project_prototypes(model, list(iterate_batches(images, labels, 4)))
    benign = [int(record.source_index[j]) for j in (0, 1)]
    assert benign[0] == 0  # prototype 0 sits exactly on image 0's patch, so it is placed first and keeps it
    assert benign[1] in {2, 4}  # prototype 1 moves on to another benign image
    assert len({int(v) for v in record.source_index}) == 4  # and no image serves two prototypes
    latent = _latent_all(model, list(iterate_batches(images, labels, 4)))
    for j in range(4):
        row, col = (int(v) for v in record.position[j])
        assert torch.equal(model.prototypes.detach()[0, j], latent[int(record.source_index[j]), 0, :, row, col])


def test_paper_projection_may_share_a_source_image() -> None:
    images, labels = _batch(6, 1)
    model = _two_benign_prototypes_on_image_zero(images, labels)
    record = project_prototypes(model, list(iterate_batches(images, labels, 4)), distinct_sources=False)
    assert int(record.source_index[0]) == int(record.source_index[1]) == 0


def test_projection_shares_an_image_only_when_a_class_has_too_few() -> None:
    images, labels = _batch(6, 1)
    model = _two_benign_prototypes_on_image_zero(images, labels)
    with torch.no_grad():  # both malignant prototypes on image 1 too, so the paper's rule would put them together
        patch = model.latent(images[1:2])[0, 0, :, 0, 0]
        model.prototypes[0, 2] = patch
        model.prototypes[0, 3] = patch + 1e-3
    eligible = torch.tensor([True, True, False, True, False, True])  # one benign candidate for two benign prototypes
    record = project_prototypes(model, list(iterate_batches(images, labels, 4, eligible)))
    assert int(record.source_index[0]) == int(record.source_index[1]) == 0  # no other benign image: shared
    assert int(record.source_index[2]) == 1 and int(record.source_index[3]) in {
        3,
        5,
    }  # malignant ones could part: they do


def test_projection_keeps_two_images_of_one_patient_apart() -> None:
    images, labels = _batch(6, 1)  # benign: 0, 2, 4
    model = _two_benign_prototypes_on_image_zero(images, labels)
    with torch.no_grad():  # prototype 1 sits on image 2 now, which belongs to image 0's patient
        model.prototypes[0, 1] = model.latent(images[2:3])[0, 0, :, 0, 0]
    loader = list(iterate_batches(images, labels, 4))
    by_image = project_prototypes(model, loader)
    assert [int(by_image.source_index[j]) for j in (0, 1)] == [0, 2]
    patients = ["a", "b", "a", "c", "d", "e"]
    by_patient = project_prototypes(model, loader, source_groups=patients)
    assert int(by_patient.source_index[0]) in {0, 2} and int(by_patient.source_index[1]) == 4


def test_served_contributions_are_shares_of_the_log_odds() -> None:
    from models.families.mupnet.export import MUPNetServingWrapper

    model = MUPNet(modalities=1, prototypes_per_modality=4, prototype_channels=CHANNELS, top_k=3).eval()
    with torch.no_grad():
        model.last_layer.weight.copy_(torch.randn_like(model.last_layer.weight))  # not the symmetric initial weights
        logits, contributions, cam = MUPNetServingWrapper(model)(torch.randn(3, 1, SIZE, SIZE))
    assert contributions.shape == (3, 4) and cam.shape[0] == 3
    assert torch.allclose(contributions.sum(dim=1), logits[:, 1] - logits[:, 0], atol=1e-5)


def test_projection_without_candidates_fails_loudly() -> None:
    model = _model(1, prototypes=2)
    images = torch.randn(2, 1, 1, SIZE, SIZE)
    labels = torch.zeros(2, dtype=torch.long)  # no malignant sample at all
    before = model.prototypes.detach().clone()
    with pytest.raises(ValueError, match="class 1"):
        project_prototypes(model, [(images, labels)])
    assert torch.equal(model.prototypes.detach(), before)


def test_birads_eligibility_follows_the_paper() -> None:
    birads = ["3", "4A", "4b", "BI-RADS 4c", "5", "5", "4a", None]
    labels = [0, 0, 0, 1, 1, 0, 1, 0]
    mask = projection_eligibility(birads, labels)
    expected = torch.tensor(
        [
            [True, True, True],  # benign BI-RADS 3: every modality
            [True, True, False],  # benign 4a: not elastography (3 vs 5 only)
            [False, False, False],  # 4b never
            [True, True, False],  # malignant 4c: not elastography
            [True, True, True],  # malignant 5
            [False, False, False],  # benign but BI-RADS 5: atypical, no candidate
            [False, False, False],  # malignant 4a: no
            [False, False, False],  # unknown
        ]
    )
    assert torch.equal(mask, expected)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_last_layer_stage_changes_only_the_last_layer() -> None:
    model = _model(1)
    images, labels = _batch(4, 1)
    before = _snapshot(model)
    optimizer = last_layer_optimizer(model, lr=1e-2)
    stats = train_last_layer_epoch(model, iterate_batches(images, labels, 2), optimizer)
    after = _snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"last_layer.weight"}
    assert stats.samples == 4 and math.isfinite(stats.loss)


def test_last_layer_stage_only_touches_the_last_layer_even_with_an_all_parameter_optimizer() -> None:
    model = _model(1)
    images, labels = _batch(2, 1)
    before = _snapshot(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    train_last_layer_epoch(model, [(images, labels)], optimizer)
    after = _snapshot(model)
    assert {name for name in before if not torch.equal(before[name], after[name])} == {"last_layer.weight"}


def test_joint_stage_trains_backbone_and_prototypes_not_the_last_layer() -> None:
    model = _model(1)
    images, labels = _batch(4, 1)
    batches = list(iterate_batches(images, labels, 4))
    # An optimizer over every parameter: the stage itself must keep the last layer frozen (paper stage 1).
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = _snapshot(model)
    first = train_joint_epoch(model, batches, optimizer)
    second = train_joint_epoch(model, batches, optimizer)
    after = _snapshot(model)
    assert math.isfinite(first.loss) and math.isfinite(second.loss)
    assert second.loss != first.loss
    assert torch.equal(before["last_layer.weight"], after["last_layer.weight"])
    assert not torch.equal(before["prototypes"], after["prototypes"])
    assert not torch.equal(before["trunks.0.stem.0.weight"], after["trunks.0.stem.0.weight"])
    assert not torch.equal(before["add_ons.0.0.weight"], after["add_ons.0.0.weight"])


def test_warm_stage_keeps_the_trunks_fixed() -> None:
    model = _model(1)
    images, labels = _batch(2, 1)
    before = _snapshot(model)
    train_joint_epoch(model, [(images, labels)], torch.optim.Adam(model.parameters(), lr=1e-3), warm=True)
    after = _snapshot(model)
    assert torch.equal(before["trunks.0.stem.0.weight"], after["trunks.0.stem.0.weight"])
    assert not torch.equal(before["prototypes"], after["prototypes"])
    assert not torch.equal(before["add_ons.0.2.weight"], after["add_ons.0.2.weight"])
    assert torch.equal(before["last_layer.weight"], after["last_layer.weight"])


def test_stage_optimizers_hold_the_right_parameters() -> None:
    model = _model(1)

    def ids(optimizer: torch.optim.Optimizer) -> set[int]:
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    joint, warm, last = (
        ids(joint_optimizer(model)),
        ids(joint_optimizer(model, warm=True)),
        ids(last_layer_optimizer(model)),
    )
    trunk = {id(p) for p in model.trunks.parameters()}
    assert id(model.prototypes) in joint and id(model.prototypes) in warm
    assert trunk <= joint and not trunk & warm
    assert id(model.last_layer.weight) not in joint | warm
    assert last == {id(model.last_layer.weight)}


def test_contributions_sum_to_the_logit() -> None:
    model = _model(3).eval()
    with torch.no_grad():
        model.last_layer.weight.add_(0.1 * torch.randn_like(model.last_layer.weight))
    images, _ = _batch(3)
    with torch.no_grad():
        out = model(images)
        predicted = out.logits.argmax(1)
        for target in (None, 0, 1):
            scores = contribution_scores(model, images, target)
            assert scores.shape == (3, 12)
            chosen = predicted if target is None else torch.full((3,), target)
            assert torch.allclose(scores.sum(1), out.logits.gather(1, chosen[:, None])[:, 0], atol=1e-5)
        # Own-class prototypes contribute positively to their class at initialisation (+1 x positive similarity).
        malignant = contributions_from(model, out.similarities, 1)
        assert torch.all(malignant[:, model.prototype_class == 1] > 0)


def test_receptive_field_matches_gradient_support() -> None:
    network = nn.Sequential(
        nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.Conv2d(1, 1, 5, stride=1, padding=2, bias=False),
    )
    for layer in network:
        if isinstance(layer, nn.Conv2d):
            nn.init.constant_(layer.weight, 1.0)
    field = receptive_field(network)
    image = torch.zeros(1, 1, 48, 48, requires_grad=True)
    output = network(image)
    row, col = 5, 2
    output[0, 0, row, col].backward()
    assert image.grad is not None
    rows, cols = torch.nonzero(image.grad[0, 0], as_tuple=True)
    support = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    assert field.box(row, col, 48, 48) == support


def test_resnet18_receptive_field() -> None:
    field = _model(1).receptive_field
    # 7x7/2 stem, 3x3/2 max-pool, then eight 3x3 convolutions per resolution pair: the textbook 435 px, stride 32.
    assert (field.jump, field.size) == (32, 435)


@pytest.mark.parametrize("modalities", [1, 3])
def test_onnx_export_matches_pytorch(tmp_path: Path, modalities: int) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _model(modalities).eval()
    path = export_onnx(model, tmp_path / "mupnet.onnx", image_size=SIZE, opset=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(EXPORT_OUTPUT_NAMES)
    images = torch.rand(2, modalities, 1, SIZE, SIZE)
    from models.families.mupnet.network import MUPNetExportWrapper

    with torch.no_grad():
        expected = MUPNetExportWrapper(model)(images)
    got = session.run(list(EXPORT_OUTPUT_NAMES), {"images": images.numpy()})
    shapes = [(2, 2), (2, modalities * 4), (2, 2, modalities * 4), (2, modalities * 4, SIZE, SIZE)]
    for name, reference, value, shape in zip(EXPORT_OUTPUT_NAMES, expected, got, shapes, strict=False):
        assert value.shape == shape, name
        assert torch.allclose(torch.from_numpy(value), reference, atol=1e-4, rtol=0), name
    # The contributions toward each class sum to that class's logit in the served graph too.
    assert torch.allclose(torch.from_numpy(got[2]).sum(-1), torch.from_numpy(got[0]), atol=1e-4)


def test_last_layer_stage_on_frozen_evidence_makes_the_same_updates_as_on_the_images() -> None:
    model = _model(1)
    images, labels = _batch(6, 1)
    on_images = _model(1)
    on_images.load_state_dict(model.state_dict())
    evidence = frozen_evidence(model, [images[:4], images[4:]])
    assert evidence.similarities.shape == (6, 4) and evidence.min_distances.shape == (6, 4)
    order = torch.tensor([5, 0, 3, 1, 4, 2])
    batches = [order[:3], order[3:]]
    stats = train_last_layer_epoch(
        model, [(evidence.take(b), labels[b]) for b in batches], last_layer_optimizer(model, lr=1e-2)
    )
    reference = train_last_layer_epoch(
        on_images, [(images[b], labels[b]) for b in batches], last_layer_optimizer(on_images, lr=1e-2)
    )
    assert not torch.equal(model.last_layer.weight, _model(1).last_layer.weight)  # it trained
    assert torch.allclose(model.last_layer.weight, on_images.last_layer.weight, atol=1e-6)
    assert stats.loss == pytest.approx(reference.loss, rel=1e-5) and stats.clustering == pytest.approx(
        reference.clustering, rel=1e-5
    )
    # The evidence still describes the model, whose trunk did not move: its probabilities are the model's own.
    with torch.no_grad():
        expected = torch.softmax(on_images.eval()(images).logits, dim=1)
    assert torch.allclose(evidence_probability(model, evidence), expected, atol=1e-6)


def test_frozen_evidence_is_refused_where_the_trunk_trains() -> None:
    model = _model(1)
    images, labels = _batch(2, 1)
    evidence = frozen_evidence(model, [images])
    with pytest.raises(ValueError, match="last layer only"):
        train_joint_epoch(model, [(evidence, labels)], torch.optim.Adam(model.parameters()))


def test_joint_epoch_runs_its_forward_pass_in_the_given_precision() -> None:
    model = _model(1)
    images, labels = _batch(2, 1)
    entered: list[torch.dtype] = []

    class Recording(torch.autocast):
        def __enter__(self) -> None:
            super().__enter__()
            entered.append(torch.get_autocast_dtype("cpu"))

    before = _snapshot(model)
    stats = train_joint_epoch(
        model, [(images, labels)], joint_optimizer(model), precision=lambda: Recording("cpu", dtype=torch.bfloat16)
    )
    assert entered == [torch.bfloat16]
    assert math.isfinite(stats.loss) and model.prototypes.dtype == torch.float32
    assert not torch.equal(before["prototypes"], model.prototypes.detach())
