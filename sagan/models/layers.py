"""Building blocks shared by G and D: spectral norm, weight init, conditional BatchNorm, label checks, readouts."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

INIT_SCHEMES = ("xavier", "orthogonal", "normal")
_SN_LAYERS = (nn.Conv2d, nn.Linear, nn.Embedding)


def init_weights(module: nn.Module, scheme: str) -> None:
    """Initialise every conv, linear and embedding weight of `module` (biases to zero).

    "xavier" is the official SAGAN code (TF's xavier_initializer, uniform), "orthogonal" is BigGAN/StudioGAN and
    "normal" is N(0, 0.02) as in DCGAN. Call before `apply_spectral_norm`: the power iteration is then started on the
    final weights.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme '{scheme}': choose one of {', '.join(INIT_SCHEMES)}")
    for m in module.modules():
        if not isinstance(m, _SN_LAYERS):
            continue
        if scheme == "xavier":
            nn.init.xavier_uniform_(m.weight)
        elif scheme == "orthogonal":
            nn.init.orthogonal_(m.weight)
        else:
            nn.init.normal_(m.weight, 0.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def apply_spectral_norm(module: nn.Module) -> None:
    """Spectrally normalise every conv, linear and embedding in `module`, one power iteration per forward.

    Uses the parametrization API (not the old hook), because the hook version breaks `copy.deepcopy`, which the EMA
    generator needs. Conditional-BN gains are plain parameters, not embeddings, so they stay unnormalised as in the
    official code.
    """
    for m in list(module.modules()):
        if isinstance(m, _SN_LAYERS) and not parametrize.is_parametrized(m, "weight"):
            parametrize.register_parametrization(m, "weight", SpectralNormFP32(m.weight, n_power_iterations=1, eps=1e-12))


class SpectralNormFP32(_SpectralNorm):
    """PyTorch's spectral-norm parametrization (the one `spectral_norm()` registers) with the power iteration and the
    division by sigma kept in fp32 under autocast: in bf16 the u/v updates lose most of their precision."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight)


def spectral_sigmas(module: nn.Module) -> dict[str, torch.Tensor]:
    """Current power-iteration estimate of the largest singular value of every SN weight, keyed by module name.

    This is sigma = u^T W v with the persisted u, v: what the layer divides its weight by in the next forward.
    """
    sigmas = {}
    for name, m in module.named_modules():
        if not parametrize.is_parametrized(m, "weight"):
            continue
        for p in m.parametrizations.weight:
            if hasattr(p, "_u"):
                w = p._reshape_weight_to_matrix(m.parametrizations.weight.original)
                sigmas[name] = torch.dot(p._u, torch.mv(w, p._v)).detach()
    return sigmas


class GeneratorBatchNorm2d(nn.Module):
    """BatchNorm of the generator blocks, called as bn(x, y).

    Class-conditional (official SAGAN): normalisation without affine parameters followed by a per-class gain and
    bias, when `num_classes > 0`; otherwise ordinary affine BatchNorm and `y` is ignored.
    """

    def __init__(self, channels: int, num_classes: int, *, momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=num_classes == 0, momentum=momentum)
        if num_classes > 0:
            self.gain = nn.Parameter(torch.ones(num_classes, channels))
            self.bias = nn.Parameter(torch.zeros(num_classes, channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.bn.affine:
            return self.bn(x)
        h = self.bn(x)
        # (B, C, H, W), y (B,) -> per-sample (B, C, 1, 1) affine, in the activation dtype: fp32 gains would promote a
        # bf16 generator to fp32 from here on under autocast.
        gain, bias = self.gain[y].to(h.dtype), self.bias[y].to(h.dtype)
        return h * gain[:, :, None, None] + bias[:, :, None, None]


def check_labels(y: torch.Tensor | None, batch: int, num_classes: int) -> None:
    """Fail clearly on labels that do not fit the model: missing, unexpected, wrong shape, dtype or range.

    The range check runs only for CPU tensors: on a GPU it would force a host sync on every step, and labels reach
    the GPU from data that has already been checked.
    """
    if num_classes == 0:
        if y is not None:
            raise ValueError("labels given to an unconditional model: build it with num_classes > 0 or pass y=None")
        return
    if y is None:
        raise ValueError(f"this model is class-conditional ({num_classes} classes): pass labels y of shape ({batch},)")
    if y.shape != (batch,) or y.dtype != torch.long:
        raise ValueError(f"labels must be an int64 tensor of shape ({batch},), got {tuple(y.shape)} {y.dtype}")
    if y.device.type == "cpu" and batch > 0 and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values from {int(y.min())} to {int(y.max())}")
