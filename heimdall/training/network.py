"""The localization network: features + mask -> position and 2x2 covariance."""

from __future__ import annotations

import math

import torch
from torch import nn

LENGTH_SCALE_M = 50_000.0
"""Internal length unit of the network, m: outputs are O(1) in it."""
MIN_SIGMA = 0.004
"""Smallest standard deviation the network may claim, in LENGTH_SCALE_M units (200 m)."""


class Localizer(nn.Module):
    """MLP over each slot's signal power, noise power (dBm) and detection flag.

    The dBm inputs are normalized inside the graph (buffers ``mean_db``,
    ``std_db``), so serving feeds the physical values. Absent stations are
    zeroed and flagged by the mask.

    Outputs, in network units: mean (B, 2) east/north, and (B, 3) sigma_e, sigma_n, rho.
    """

    mean_db: torch.Tensor
    std_db: torch.Tensor

    def __init__(
        self,
        n_slots: int,
        n_features: int,
        hidden: int = 256,
        mean_db: float = 0.0,
        std_db: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("mean_db", torch.tensor(float(mean_db)))
        self.register_buffer("std_db", torch.tensor(float(std_db)))
        self.body = nn.Sequential(
            nn.Linear(n_slots * n_features + n_slots, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2),
            nn.GELU(),
        )
        self.head = nn.Linear(hidden // 2, 5)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.unsqueeze(-1)
        power = (features[..., 0:2] - self.mean_db) / self.std_db
        x = torch.cat([power, features[..., 2:3]], dim=-1) * m
        h = self.body(torch.cat([x.flatten(1), mask], dim=1))
        out = self.head(h)
        mean = out[:, 0:2]
        sigma = nn.functional.softplus(out[:, 2:4]) + MIN_SIGMA
        rho = 0.98 * torch.tanh(out[:, 4:5])
        return mean, torch.cat([sigma, rho], dim=1)


def gaussian_nll(
    mean: torch.Tensor, uncertainty: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Mean negative log-likelihood of ``target`` under the bivariate Gaussians."""
    sx, sy, rho = uncertainty[:, 0], uncertainty[:, 1], uncertainty[:, 2]
    dx = (target[:, 0] - mean[:, 0]) / sx
    dy = (target[:, 1] - mean[:, 1]) / sy
    one_minus = 1.0 - rho**2
    z = (dx**2 - 2.0 * rho * dx * dy + dy**2) / one_minus
    nll = (
        torch.log(sx) + torch.log(sy) + 0.5 * torch.log(one_minus) + 0.5 * z + math.log(2 * math.pi)
    )
    return nll.mean()


class ExportWrapper(nn.Module):
    """Serving graph: outputs in metres, covariance calibrated by a scalar scale."""

    def __init__(self, net: Localizer, covariance_scale: float) -> None:
        super().__init__()
        self.net = net
        self.sigma_scale = math.sqrt(covariance_scale)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, unc = self.net(features, mask)
        position_m = mean * LENGTH_SCALE_M
        sigma_m = unc[:, 0:2] * (LENGTH_SCALE_M * self.sigma_scale)
        return position_m, torch.cat([sigma_m, unc[:, 2:3]], dim=1)
