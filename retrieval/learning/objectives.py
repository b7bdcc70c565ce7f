"""What a fine-tune minimises: cross-entropy on the new head, metric losses on the L2-normalised fc7 that the index stores."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from retrieval.names import FINE_TUNE_METRIC_LOSSES as METRIC_LOSSES
from retrieval.names import FINE_TUNE_OBJECTIVES as OBJECTIVES

# "ce": cross-entropy of the classification head (fc7 shaped only through it);
# "proxy-anchor": Proxy-Anchor (Kim et al., CVPR 2020) on L2-normalised fc7, one learned proxy per class;
# "norm-softmax": softmax over the cosines of L2-normalised fc7 to one learned proxy per class, scaled (NormFace,
#   Proxy-NCA++); "supcon": supervised contrastive (Khosla et al., 2020) over two views of each image;
# "triplet": batch-hard triplets (Hermans et al., 2017) over two views of each image, margin TRIPLET_MARGIN;
# "ce+X": both, summed. The head is always trained by cross-entropy (its accuracy is reported); without "ce" it
# learns on a detached fc7, so only X shapes the features.

PROXY_ANCHOR_ALPHA = 32.0      # Proxy-Anchor's scale and margin, the paper's values
PROXY_ANCHOR_DELTA = 0.1
NORM_SOFTMAX_SCALE = 16.0      # 1 / temperature of norm-softmax
SUPCON_TEMPERATURE = 0.1
TRIPLET_MARGIN = 0.2           # on L2-normalised vectors (distances in [0, 2])
PROXY_LR_SCALE = 10.0          # proxies learn this much faster than the network (they start random)


class Objective(nn.Module):
    """A named objective (OBJECTIVES) and the proxies it learns, if any.

    forward(fc7 shape=(B, 4096) after the ReLU, logits shape=(B, C), labels shape=(B,) int64) -> scalar loss.
    Objectives over pairs ("supcon", "triplet") want two views of each image in the batch (views_per_image = 2),
    the first B/2 rows one view each, the last B/2 the second view in the same order.
    """

    def __init__(self, name: str, num_classes: int, dim: int, seed: int):
        super().__init__()
        assert name in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, not {name!r}"
        self.name = name
        self.cross_entropy = name == "ce" or name.startswith("ce+")
        self.metric = name.split("+")[-1] if name != "ce" else None
        self.proxies = None
        if self.metric in ("proxy-anchor", "norm-softmax"):
            gen = torch.Generator().manual_seed(seed + 1)
            self.proxies = nn.Parameter(torch.randn(num_classes, dim, generator=gen) / dim ** 0.5)   # (C, 4096)

    @property
    def views_per_image(self) -> int:
        return 2 if self.metric in ("supcon", "triplet") else 1

    def forward(self, fc7: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                head_logits_detached: torch.Tensor | None = None) -> torch.Tensor:
        """The loss; head_logits_detached: the head's logits on a detached fc7 (trains the head alone when the
        objective has no cross-entropy of its own)."""
        loss = fc7.new_zeros(())
        if self.cross_entropy:
            loss = loss + F.cross_entropy(logits, labels)
        elif head_logits_detached is not None:
            loss = loss + F.cross_entropy(head_logits_detached, labels)
        if self.metric is not None:
            loss = loss + self.metric_loss(fc7, labels)
        return loss

    def metric_loss(self, fc7: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(fc7, dim=1)                                          # (B, 4096), unit rows as indexed
        if self.metric == "proxy-anchor":
            return proxy_anchor(z, labels, F.normalize(self.proxies, dim=1))
        if self.metric == "norm-softmax":
            return F.cross_entropy(NORM_SOFTMAX_SCALE * z @ F.normalize(self.proxies, dim=1).T, labels)
        if self.metric == "supcon":
            return supervised_contrastive(z, labels)
        return batch_hard_triplet(z, labels)


def proxy_anchor(z: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor,
                 alpha: float = PROXY_ANCHOR_ALPHA, delta: float = PROXY_ANCHOR_DELTA) -> torch.Tensor:
    """Proxy-Anchor loss. z: shape=(B, D) unit rows; proxies: shape=(C, D) unit rows; labels: shape=(B,) int64."""
    cos = z @ proxies.T                                                      # (B, C)
    pos = F.one_hot(labels, proxies.shape[0]).bool()                         # (B, C)
    present = pos.any(0)                                                     # proxies with a positive in the batch
    pos_term = torch.where(pos, torch.exp(-alpha * (cos - delta)), torch.zeros_like(cos)).sum(0)   # (C,)
    neg_term = torch.where(~pos, torch.exp(alpha * (cos + delta)), torch.zeros_like(cos)).sum(0)   # (C,)
    return torch.log1p(pos_term[present]).sum() / present.sum() + torch.log1p(neg_term).sum() / proxies.shape[0]


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float = SUPCON_TEMPERATURE) -> torch.Tensor:
    """SupCon loss over the batch (every other row of the same label is a positive). z: shape=(B, D) unit rows."""
    sim = z @ z.T / temperature                                              # (B, B)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    has = pos.any(1)
    per_row = -(log_prob.masked_fill(~pos, 0.0).sum(1)[has]) / pos.sum(1)[has]
    return per_row.mean()


def batch_hard_triplet(z: torch.Tensor, labels: torch.Tensor, margin: float = TRIPLET_MARGIN) -> torch.Tensor:
    """Batch-hard triplet loss: each row's farthest positive against its nearest negative. z: shape=(B, D) unit rows."""
    d = torch.cdist(z, z)                                                    # (B, B)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    hardest_pos = d.masked_fill(~same | eye, 0.0).max(1).values
    hardest_neg = d.masked_fill(same, float("inf")).min(1).values
    valid = (same & ~eye).any(1) & torch.isfinite(hardest_neg)
    if not valid.any():
        return z.sum() * 0.0
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()
