"""Sub-center ArcFace with dynamic margins, distillation terms, augmentation, schedule (no training)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fieldreid.errors import InputError  # noqa: E402
from fieldreid.train.data import AugmentConfig, augment, epoch_order  # noqa: E402
from fieldreid.train.losses import (  # noqa: E402
    SubCenterArcFace,
    cosine_distill_loss,
    dynamic_margins,
    relational_distill_loss,
)
from fieldreid.train.trainer import TrainConfig, lr_at  # noqa: E402


def test_dynamic_margins_follow_class_frequency():
    m = dynamic_margins([1, 2, 10, 100], m_min=0.05, m_max=0.5)
    assert m[0] == pytest.approx(0.5) and m[-1] == pytest.approx(0.05)
    assert np.all(np.diff(m) < 0)  # rarer class -> larger margin
    assert np.allclose(dynamic_margins([5, 5, 5]), 0.5)
    with pytest.raises(InputError):
        dynamic_margins([0, 3])


def test_subcenter_arcface_margin_and_learning():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(24, 16), dim=1)
    labels = torch.arange(24) % 4
    head0 = SubCenterArcFace(16, 4, margins=0.0, k=3, scale=10.0)
    head = SubCenterArcFace(16, 4, margins=0.5, k=3, scale=10.0)
    head.weight.data.copy_(head0.weight.data)
    assert float(head(emb, labels).detach()) > float(head0(emb, labels).detach())  # the margin makes the target harder
    assert head.cosine(emb).shape == (24, 4)
    x = emb.clone().requires_grad_(True)
    opt = torch.optim.Adam([x, *head.parameters()], lr=0.05)
    first = float(head(x, labels).detach())
    for _ in range(60):
        opt.zero_grad()
        loss = head(x, labels)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_distill_terms():
    a = torch.randn(6, 8)
    assert float(cosine_distill_loss(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(relational_distill_loss(a, 2 * a)) == pytest.approx(0.0, abs=1e-6)
    # relational term works across widths
    assert float(relational_distill_loss(a, torch.randn(6, 20))) > 0


def test_augment_is_seeded_and_keeps_shape():
    img = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    cfg = AugmentConfig(p_affine=1, p_color=1, p_clahe=1, p_sharpen=1)
    a = augment(img, np.random.default_rng(3), cfg)
    b = augment(img, np.random.default_rng(3), cfg)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, img)
    assert np.array_equal(epoch_order(10, 0, 1), epoch_order(10, 0, 1))
    assert not np.array_equal(epoch_order(10, 0, 1), epoch_order(10, 0, 2))


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(metadata="x", warmup_epochs=1.0, lr_decay=0.8)
    assert lr_at(0, 10, cfg) == pytest.approx(0.01)
    assert lr_at(10, 10, cfg) == pytest.approx(1.0)
    assert lr_at(20, 10, cfg) == pytest.approx(0.8)
