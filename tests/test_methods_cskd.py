"""CS-KD in the torch loaders (class-pair batches, partners and second views) and the CS-KD objectives."""
from __future__ import annotations

import copy

import pytest
import torch

from engine.config import ConfigError
from engine.models import create_model
from engine.objectives import build_objective, check_config
from engine.objectives.cskd import bn_buffers
from engine.objectives.functional import kd_loss
from engine.setup_run import data_from_config
from engine.train import train
from engine.types import Batch, ExitOutputs
from pipelines.base import LoaderSpec
from pipelines.samplers import ClassPairBatchSampler
from pipelines.torch_loader import TensorLoader
from pipelines.transforms import normalize
from tests.helpers import tiny_config
from tests.photo_folder import write_photo_folder

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------- loaders


def test_digits_partners_share_the_anchor_class_and_anchors_match_the_plain_loader(tmp_path):
    over = ["data.augment=none", "data.limit_train=320"]
    pair = data_from_config(tiny_config(tmp_path, *over, "objective.name=cskd", "data.sampler=class_pair"), CPU).train
    plain = data_from_config(tiny_config(tmp_path, *over, "objective.name=ce"), CPU).train
    assert pair.pairs is not None and len(pair) == len(plain) == 5
    table = normalize(pair.images, pair.mean, pair.std).flatten(1)
    for epoch in (0, 1):
        pair.set_epoch(epoch)
        plain.set_epoch(epoch)
        for b, q in zip(pair, plain):
            assert torch.equal(b.images, q.images) and torch.equal(b.labels, q.labels)  # same anchors
            partner = b.extra["partner"]
            assert partner.shape == b.images.shape and "view" not in b.extra
            for img, y in zip(partner.flatten(1), b.labels):
                rows = (table == img).all(1).nonzero().flatten()
                assert len(rows) > 0 and bool((pair.labels[rows] == y).any())


def _one_image_per_class_loader(extra_view=False, seed=0):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (6, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(6)  # every class has one image: each partner *is* its anchor's image
    sampler = ClassPairBatchSampler(labels, 3, seed=seed, drop_last=True)
    return TensorLoader(images, labels, LoaderSpec(3, True, "crop_flip", 8, (0.5,), (0.25,), seed=seed, pairs=sampler,
                                                   extra_view=extra_view), CPU)


def _batches(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return list(loader)


def test_partner_and_view_get_their_own_augmentation_deterministically():
    loader = _one_image_per_class_loader(extra_view=True)
    first = _batches(loader, 0)
    assert len(first) == 2
    differs = [not torch.equal(b.images, b.extra["partner"]) for b in first]
    assert any(differs)  # same source image, independent crop/flip
    assert any(not torch.equal(b.images, b.extra["view"]) for b in first)
    again = _batches(_one_image_per_class_loader(extra_view=True), 0)
    for a, b in zip(first, again):  # same seed, same batches, same augmentation
        for k in ("partner", "view"):
            assert torch.equal(a.extra[k], b.extra[k])
        assert torch.equal(a.images, b.images)
    tail = _batches(loader, 0, start=1)  # resume mid-epoch: exactly the remaining batch
    assert len(tail) == 1 and torch.equal(tail[0].extra["partner"], first[1].extra["partner"])
    assert not torch.equal(_batches(loader, 1)[0].extra["partner"], first[0].extra["partner"])


def test_folder_loader_pairs_and_views(tmp_path):
    root = write_photo_folder(tmp_path / "photos", {"train": 6, "test": 2}, classes=3, min_side=20, max_side=28,
                              fmt="png", tint=True)
    cfg = tiny_config(tmp_path, "objective.name=cskd", "data.dataset=imagefolder", f"data.root={root}",
                      "model.in_chans=3", "model.num_classes=3", "data.image_size=16", "data.val_split=0",
                      "data.augment=random_resized_crop", "data.workers=0", "data.batch_size=4",
                      "data.sampler=class_pair", "data.extra_view=true", "objective.cskd.allow_self_partner=false",
                      "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]")
    loader = data_from_config(cfg, CPU).train
    batches = _batches(loader, 0)
    assert len(batches) == len(loader) == 5  # 18 anchors, B = 4: ceil(18/4), the last batch of 2 (official)
    for b, n in zip(batches, [4, 4, 4, 4, 2], strict=True):
        for key in ("partner", "view"):
            x = b.extra[key]
            assert x.shape == b.images.shape == (n, 3, 16, 16)
            assert torch.equal(x.mean(dim=(2, 3)).argmax(1), b.labels)  # tinted: class = brightest channel
        assert not torch.equal(b.images, b.extra["view"])  # own random-resized crop per view


def test_synthetic_data_carries_partners_and_views(tmp_path):
    cfg = tiny_config(tmp_path, "objective.name=cskd", "data.sampler=class_pair", "data.extra_view=true",
                      "data.dataset=synthetic")
    batch = next(iter(data_from_config(cfg, CPU).train))
    assert set(batch.extra) == {"partner", "view"}
    for images in batch.extra.values():  # the anchors' shape, other images
        assert images.shape == batch.images.shape and not torch.equal(images, batch.images)


# ------------------------------------------------------------------------------------- objectives


@pytest.fixture()
def model_and_batch(tmp_path):
    cfg = tiny_config(tmp_path, "objective.name=cskd", "data.sampler=class_pair", "data.extra_view=true")
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.exits).train()
    g = torch.Generator().manual_seed(1)
    x, xp, xv = (torch.randn(8, 1, 8, 8, generator=g) for _ in range(3))
    batch = Batch(x, torch.arange(8) % 10, {"partner": xp + 1.0, "view": xv})
    return cfg, model, batch


def _running_means(model):
    return [b.clone() for b in bn_buffers(model)]


@pytest.mark.parametrize("updates_bn", [True, False])
def test_cskd_objective_partner_no_grad_and_bn_switch(tmp_path, model_and_batch, updates_bn):
    cfg, model, batch = model_and_batch
    cfg.objective.cskd.partner_updates_bn = updates_bn
    obj = build_objective(cfg, model.num_exits, CPU)
    ref = copy.deepcopy(model)
    loss, out = obj(model, batch)
    # reference: the official sequence on a copy: anchors (grad), then partners (no grad)
    z = ref(batch.images).logits[-1]
    anchors_only = _running_means(ref)
    with torch.no_grad():
        zp = ref(batch.extra["partner"]).logits[-1]
    expected_bn = _running_means(ref) if updates_bn else anchors_only
    for a, b in zip(bn_buffers(model), expected_bn):
        torch.testing.assert_close(a, b)
    assert list(loss.terms) == ["ce", "cskd"]
    torch.testing.assert_close(loss.terms["cskd"], kd_loss(z, zp, 4.0, "kl", True))
    torch.testing.assert_close(out.logits[-1], z)
    loss.total.backward()  # the restore never touches what the anchors' graph saved
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)


def test_cskd_e_every_exit_and_byot_combination(model_and_batch):
    cfg, model, batch = model_and_batch
    cfg.objective.cskd.sample_wise = True
    cfg.objective.cskd.exits = "all"
    loss, _ = build_objective(cfg, model.num_exits, CPU)(model, batch)
    assert set(loss.terms) == {f"{t}_{i}" for t in ("ce", "cskd", "cskd_sample") for i in range(4)}
    cfg.objective.name = "byot_cskd"
    cfg.objective.cskd.exits = "deepest"
    cfg.objective.cskd.sample_wise = False
    cfg.objective.backend = "torch"
    loss, _ = build_objective(cfg, model.num_exits, CPU)(model, batch)
    assert set(loss.terms) == {"ce_0", "ce_1", "ce_2", "ce_3", "kd_0", "kd_1", "kd_2", "hint_0", "hint_1", "hint_2",
                               "cskd"}
    torch.testing.assert_close(loss.total, torch.stack(list(loss.terms.values())).sum())


def test_mixup_cskd_runs_and_mixes(model_and_batch):
    cfg, model, batch = model_and_batch
    cfg.objective.name = "mixup_cskd"
    cfg.objective.mixup.alpha = 1.0
    loss, _ = build_objective(cfg, model.num_exits, CPU)(model, batch)
    assert list(loss.terms) == ["ce", "cskd"] and loss.total.requires_grad


def test_missing_partner_is_a_clear_error(model_and_batch):
    cfg, model, batch = model_and_batch
    with pytest.raises(KeyError, match="data.sampler=class_pair"):
        build_objective(cfg, model.num_exits, CPU)(model, Batch(batch.images, batch.labels))


@pytest.mark.parametrize("overrides,match", [
    (["objective.name=cskd"], "data.sampler=class_pair"),
    (["objective.name=byot_cskd"], "data.sampler=class_pair"),
    (["objective.name=byot_cskd", "data.sampler=class_pair", "exits.stages=[]"], "exits.stages"),
    (["objective.name=cskd", "data.sampler=class_pair", "objective.cskd.sample_wise=true"], "extra_view"),
    (["objective.name=mixup"], "mixup.alpha"),
    (["objective.name=mixup_cskd", "objective.mixup.alpha=1.0"], "data.sampler=class_pair"),
    (["objective.name=mixup_cskd", "objective.mixup.alpha=1.0", "data.sampler=class_pair", "data.extra_view=true",
      "objective.cskd.sample_wise=true"], "objective.cskd.sample_wise=false"),
    (["objective.name=kd"], "teacher.checkpoint"),
    (["objective.name=sd_generation"], "teacher.checkpoint"),
    (["objective.name=byot", "exits.stages=[]"], "exits.stages"),
    (["objective.name=ls_all_classes"], "objective.name"),
    (["objective.name=cskd", "data.sampler=class_pair", "objective.log_eps=1e-8"], "objective.log_eps"),
])
def test_config_errors(tmp_path, overrides, match):
    """What an objective requires is asked of it before it is built, and the message names the key."""
    cfg = tiny_config(tmp_path, *overrides)
    with pytest.raises(ConfigError, match=match):
        check_config(cfg)
    with pytest.raises(ConfigError, match=match):
        build_objective(cfg, 4, CPU)


@pytest.mark.parametrize("overrides", [
    ["objective.name=sd_generation", "generations=2"],  # the chain gives every generation its teacher
    ["objective.name=cskd", "data.sampler=class_pair", "objective.cskd.sample_wise=true", "data.extra_view=true"],
    ["objective.name=byot_cskd", "data.sampler=class_pair"],
    ["objective.name=mixup_cskd", "objective.mixup.alpha=1.0", "data.sampler=class_pair"],
    ["objective.name=label_smoothing", "objective.log_eps=0.001"],
])
def test_configs_that_meet_the_requirements_pass(tmp_path, overrides):
    check_config(tiny_config(tmp_path, *overrides))


def test_cskd_e_trains_end_to_end(tmp_path):
    cfg = tiny_config(tmp_path, "objective.name=cskd", "data.sampler=class_pair", "data.extra_view=true",
                      "objective.cskd.sample_wise=true", "objective.cskd.partner_updates_bn=false",
                      "schedule.epochs=1", "data.limit_train=256")
    s = train(cfg, device="cpu")
    assert {"test_best", "test_last"} <= set(s)
    assert "recall1" in s["test_best"]["exit3"] and "recall1" not in s["test_best"]["ens_logits"]


class _Recorder(torch.nn.Module):
    """A one-exit model that records each forward's input and whether autograd was recording."""

    def __init__(self, pixels: int, classes: int = 10):
        super().__init__()
        self.fc = torch.nn.Linear(pixels, classes)
        self.calls: list[tuple[torch.Tensor, bool, torch.Tensor]] = []

    def forward(self, x):
        z = self.fc(x.flatten(1))
        self.calls.append((x.detach().clone(), torch.is_grad_enabled(), z.detach()))
        return ExitOutputs([z], [x.flatten(1)])


@pytest.mark.parametrize("name, overrides", [
    ("cskd", {}), ("cskd", {"partner_updates_bn": False}), ("cskd", {"sample_wise": True}),
    ("byot_cskd", {}), ("mixup_cskd", {}), ("mixup_cskd", {"partner_updates_bn": False}),
])
def test_partner_and_view_forwards_record_no_autograd_graph(model_and_batch, name, overrides):
    # The partner (and second-view) forward must run under no_grad: with a graph it would still give the same loss
    # and gradients (the targets are detached) but keep every activation alive, doubling activation memory.
    cfg, model, batch = model_and_batch
    cfg.objective.name, cfg.objective.mixup.alpha, cfg.objective.backend = name, 1.0, "torch"
    for k, v in overrides.items():
        setattr(cfg.objective.cskd, k, v)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append((args[0].data_ptr(), torch.is_grad_enabled())))
    loss, _ = build_objective(cfg, model.num_exits, CPU)(model, batch)
    hook.remove()
    expected = 3 if overrides.get("sample_wise") else 2
    assert len(seen) == expected and sum(grad for _, grad in seen) == 1  # one anchor forward with a graph
    loss.total.backward()


def test_mixup_cskd_one_mixing_weight_and_one_permutation(tmp_path):
    # Anchors are one-hot images at pixels 0..B-1, partners 2 x one-hot at pixels 16..16+B-1: every mixed input
    # reveals its l and permutation, and the partners' must be the anchors'.
    cfg = tiny_config(tmp_path, "objective.name=mixup_cskd", "data.sampler=class_pair", "objective.mixup.alpha=1.0")
    B = 6
    eye = torch.eye(64).view(64, 1, 8, 8)
    batch = Batch(eye[:B], torch.tensor([0, 1, 2, 0, 1, 2]), {"partner": 2 * eye[16:16 + B]})
    model = _Recorder(64)
    torch.manual_seed(3)
    loss, out = build_objective(cfg, 1, CPU)(model, batch)
    (xa, grad_a, za), (xp, grad_p, zp) = sorted(model.calls, key=lambda c: not c[1])  # the anchors' call had grad
    assert grad_a and not grad_p

    def lam_perm(x, first):
        v = x.flatten(1)[:, first:first + B]
        perm = [int(j if (row > 0).sum() == 1 else ((row > 0) & (torch.arange(B) != j)).nonzero()) for j, row in
                enumerate(v)]
        lam = {round(float(v[j, j]), 6) for j in range(B) if perm[j] != j}
        return lam, perm

    lam_a, perm_a = lam_perm(xa, 0)
    lam_p, perm_p = lam_perm(xp / 2, 16)
    assert perm_a != list(range(B)) and len(lam_a) == 1  # one l for the whole batch
    assert (lam_p, perm_p) == (lam_a, perm_a)
    lam, perm = lam_a.pop(), torch.tensor(perm_a)
    y = batch.labels
    ce = lam * torch.nn.functional.cross_entropy(za, y) + (1 - lam) * torch.nn.functional.cross_entropy(za, y[perm])
    torch.testing.assert_close(loss.terms["ce"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.terms["cskd"], kd_loss(za, zp, 4.0, "kl", True), rtol=1e-5, atol=1e-6)
