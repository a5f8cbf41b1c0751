"""A generator for inference only: spectral norm folded into plain weights (each weight replaced by W / sigma with the
u and v it has now, what the network computes in eval mode), BatchNorm with its running (or standing) statistics."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from sagan.checkpoint import model_settings
from sagan.models import build_models


def folded_generator(state: dict[str, Any], *, ema: bool = True) -> nn.Module:
    """G_ema (or G) of a loaded checkpoint, in eval mode, without parametrizations: the same function, plain weights.

    Built afresh from the checkpoint's model record, not copied: a copied parametrized module shares its class with the
    original, and removing the parametrization from one would remove it from both."""
    model = OmegaConf.create(model_settings(state["model"]))
    G, _ = build_models(model, model.num_classes)
    G.load_state_dict(state["trainer"]["G_ema" if ema else "G"])
    G.eval()
    for module in list(G.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return G.requires_grad_(False)
