"""GAN losses as pure functions of discriminator logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from sagan.utils.errors import UserError

Loss = Callable[..., torch.Tensor]


def d_hinge(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """SAGAN's discriminator loss: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def g_hinge(fake: torch.Tensor) -> torch.Tensor:
    """SAGAN's generator loss: -E[D(G(z))]."""
    return -fake.mean()


def d_nonsaturating(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Goodfellow et al.'s cross-entropy: -E[log sigmoid(D(x))] - E[log(1 - sigmoid(D(G(z))))]."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_nonsaturating(fake: torch.Tensor) -> torch.Tensor:
    """-E[log sigmoid(D(G(z)))]: the non-saturating generator loss."""
    return F.softplus(-fake).mean()


def d_wasserstein(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN critic loss E[D(G(z))] - E[D(x)]; spectral norm stands in for the Lipschitz constraint."""
    return fake.mean() - real.mean()


LOSSES: dict[str, tuple[Loss, Loss]] = {
    "hinge": (d_hinge, g_hinge),
    "nonsaturating": (d_nonsaturating, g_nonsaturating),
    "wasserstein": (d_wasserstein, g_hinge),  # the WGAN generator loss is also -E[D(G(z))]
}


def get_losses(name: str) -> tuple[Loss, Loss]:
    """(d_loss, g_loss) for a loss name."""
    if name not in LOSSES:
        raise UserError(f"unknown loss '{name}': choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
