"""Losses: sub-center ArcFace with dynamic margins (MiewID), and embedding distillation terms.

**Sub-center ArcFace** (Deng et al., ECCV 2020): each class has ``k`` unit-norm centres; a sample's cosine to
a class is its best centre's, so a class with two looks (left and right flank, day and night) need not be
squeezed onto one point. MiewID uses ``k = 3``.

**Dynamic margins** (Ha et al., Google Landmark Recognition 2020, which MiewID follows): rare classes get a
larger additive angular margin, frequent ones a smaller one,

    m_c = m_min + (m_max - m_min) * (n_c^(-1/4) - min_j n_j^(-1/4)) / (max_j n_j^(-1/4) - min_j n_j^(-1/4))

with ``n_c`` the number of training images of class ``c``, ``m_max = 0.5`` (MiewID's starting margin) and
``m_min = 0.05``. All classes get ``m_max`` when every class has the same count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fieldreid.errors import InputError


def dynamic_margins(counts: Sequence[int], m_min: float = 0.05, m_max: float = 0.5,
                    power: float = -0.25) -> np.ndarray:
    """Per-class margins from class frequencies (see the module docstring); float32 ``(C,)``."""
    n = np.asarray(counts, np.float64)
    if n.ndim != 1 or len(n) == 0 or np.any(n < 1):
        raise InputError(f"counts must be a non-empty list of positive integers, got {list(counts)[:5]}...")
    if not 0.0 <= m_min <= m_max < math.pi / 2:
        raise InputError(f"Margins need 0 <= m_min <= m_max < pi/2, got {m_min}, {m_max}.")
    f = n ** power
    span = f.max() - f.min()
    if span <= 0:
        return np.full(len(n), m_max, np.float32)
    return (m_min + (m_max - m_min) * (f - f.min()) / span).astype(np.float32)


class SubCenterArcFace(nn.Module):
    """Sub-center ArcFace head: embeddings ``(B, D)`` + labels ``(B,)`` -> cross-entropy loss.

    ``margins`` is one margin per class (radians), e.g. from :func:`dynamic_margins`. ``scale`` multiplies the
    cosine logits (MiewID used 51.5 with thousands of classes; 30 suits a few hundred).
    """

    def __init__(self, embedding_dim: int, num_classes: int, margins: Sequence[float] | float = 0.5,
                 k: int = 3, scale: float = 30.0) -> None:
        super().__init__()
        if num_classes < 2 or k < 1:
            raise InputError(f"ArcFace needs >= 2 classes and k >= 1, got {num_classes} classes, k={k}.")
        self.num_classes, self.k, self.scale = int(num_classes), int(k), float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes * k, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        m = torch.as_tensor(np.broadcast_to(np.asarray(margins, np.float32), (num_classes,)).copy())
        self.register_buffer("margins", m)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` cosine of each sample to the nearest sub-centre of each class."""
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))
        return cos.view(-1, self.num_classes, self.k).amax(dim=2)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(emb).clamp(-1.0 + 1e-7, 1.0 - 1e-7)
        m = self.margins[labels]  # (B,)
        cos_y = cos.gather(1, labels[:, None]).squeeze(1)
        sin_y = torch.sqrt(1.0 - cos_y * cos_y)
        phi = cos_y * torch.cos(m) - sin_y * torch.sin(m)  # cos(theta + m)
        # Past theta = pi - m, cos(theta + m) would rise again; continue linearly instead (ArcFace's "th/mm").
        phi = torch.where(cos_y > torch.cos(math.pi - m), phi, cos_y - torch.sin(math.pi - m) * m)
        logits = cos.scatter(1, labels[:, None], phi[:, None]) * self.scale
        return F.cross_entropy(logits, labels)


def cosine_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos(student_i, teacher_i)``: the student's vectors point where the teacher's do."""
    return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()


def relational_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the in-batch cosine-similarity matrices (relational KD): same neighbourhoods.

    Independent of the two embedding widths, so any teacher works; the diagonal (always 1) is left out.
    """
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher, dim=1)
    ss, tt = s @ s.T, t @ t.T
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    if not off.any():
        return student.sum() * 0.0
    return F.mse_loss(ss[off], tt[off])
