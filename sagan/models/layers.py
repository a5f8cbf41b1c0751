"""Building blocks shared by G and D: spectral norm, weight init, conditional BatchNorm, label checks, readouts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm
from sagan.utils.errors import UserError

INIT_SCHEMES = ("xavier", "orthogonal", "normal")
# model.sn_update: the order of the power iteration's two half-steps. "uv" is PyTorch's parametrization (u from the
# stored v, then v); "vu" is the official TF code, PyTorch's older `spectral_norm` hook and so StudioGAN (v from the
# stored u, then u).
SN_UPDATES = ("uv", "vu")
COND_BN_FORMS = ("tables", "linear")  # model.cond_bn, see GeneratorBatchNorm2d
_SN_LAYERS = (nn.Conv2d, nn.Linear, nn.Embedding)


def init_weights(module: nn.Module, scheme: str) -> None:
    """Initialise every conv, linear and embedding weight of `module` (biases to zero).

    "xavier" is the official SAGAN code (TF's xavier_initializer, uniform), "orthogonal" is BigGAN/StudioGAN and
    "normal" is N(0, 0.02) as in DCGAN. Call before `apply_spectral_norm`: the power iteration is then started on the
    final weights.
    """
    if scheme not in INIT_SCHEMES:
        raise UserError(f"unknown init scheme '{scheme}': choose one of {', '.join(INIT_SCHEMES)}")
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


def apply_spectral_norm(module: nn.Module, *, update: str = "uv") -> None:
    """Spectrally normalise every conv, linear and embedding in `module`, one power iteration per forward, its two
    half-steps in the order `update` names (SN_UPDATES).

    Uses the parametrization API (not the old hook), because the hook version breaks `copy.deepcopy`, which the EMA
    generator needs. Conditional-BN tables are plain parameters, not embeddings, so they stay unnormalised as in the
    official code (`cond_bn="linear"` makes them linear layers, which are normalised).
    """
    if update not in SN_UPDATES:
        raise UserError(f"unknown model.sn_update '{update}': choose one of {', '.join(SN_UPDATES)}")
    kind = SpectralNormFP32 if update == "uv" else SpectralNormVFirst
    for m in list(module.modules()):
        if isinstance(m, _SN_LAYERS) and not parametrize.is_parametrized(m, "weight"):
            parametrize.register_parametrization(m, "weight", kind(m.weight, n_power_iterations=1, eps=1e-12))


class SpectralNormFP32(_SpectralNorm):
    """PyTorch's spectral-norm parametrization (the one `spectral_norm()` registers) with the power iteration and the
    division by sigma kept in fp32 under autocast: in bf16 the u/v updates lose most of their precision."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight)


class SpectralNormVFirst(SpectralNormFP32):
    """The same with the power iteration's half-steps swapped: v = normalize(W^T u), then u = normalize(W v), as the
    official code and PyTorch's `spectral_norm` hook (StudioGAN) compute them. Both estimate sigma = u^T W v; one step
    of each from the same u and v gives slightly different estimates."""

    @torch.no_grad()
    def _power_method(self, weight_mat: torch.Tensor, n_power_iterations: int) -> None:
        for _ in range(n_power_iterations):  # in place, like the parent: DDP and DataParallel rely on it
            self._v = F.normalize(torch.mv(weight_mat.H, self._u), dim=0, eps=self.eps, out=self._v)
            self._u = F.normalize(torch.mv(weight_mat, self._v), dim=0, eps=self.eps, out=self._u)


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

    Class-conditional when `num_classes > 0`: normalisation without affine parameters, then a per-class gain and
    bias. `form="tables"` (the official SAGAN code) keeps them as two (classes, C) tables, gain starting at 1;
    `form="linear"` (StudioGAN) computes them as 1 + W_g onehot(y) and W_b onehot(y) with two bias-free linear layers
    (spectrally normalised and initialised with the rest of G). Unconditional: ordinary affine BatchNorm, `y` ignored.
    """

    def __init__(
        self, channels: int, num_classes: int, *, momentum: float = 0.1, eps: float = 1e-5, form: str = "tables"
    ) -> None:
        super().__init__()
        if form not in COND_BN_FORMS:
            raise UserError(f"unknown model.cond_bn '{form}': choose one of {', '.join(COND_BN_FORMS)}")
        self.bn = nn.BatchNorm2d(channels, affine=num_classes == 0, momentum=momentum, eps=eps)
        self.form = form
        if num_classes > 0 and form == "tables":
            self.gain = nn.Parameter(torch.ones(num_classes, channels))
            self.bias = nn.Parameter(torch.zeros(num_classes, channels))
        elif num_classes > 0:
            self.gain = nn.Linear(num_classes, channels, bias=False)
            self.bias = nn.Linear(num_classes, channels, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.bn.affine:
            return self.bn(x)
        h = self.bn(x)
        if y.is_floating_point():  # class weights (B, classes): a mixture of the classes' gains and biases
            gain_table = self.gain if self.form == "tables" else 1 + self.gain.weight.t()
            bias_table = self.bias if self.form == "tables" else self.bias.weight.t()
            gain, bias = y @ gain_table, y @ bias_table
        elif self.form == "tables":
            gain, bias = self.gain[y], self.bias[y]
        else:
            # W onehot(y) is column y of W: indexed, not multiplied (exact, and no TF32 rounding on a GPU).
            gain, bias = 1 + self.gain.weight.t()[y], self.bias.weight.t()[y]
        # (B, C, H, W), y (B,) -> per-sample (B, C, 1, 1) affine, in the activation dtype: fp32 gains would promote a
        # bf16 generator to fp32 from here on under autocast.
        gain, bias = gain.to(h.dtype), bias.to(h.dtype)
        return h * gain[:, :, None, None] + bias[:, :, None, None]


def check_labels(y: torch.Tensor | None, batch: int, num_classes: int, *, training: bool) -> None:
    """Fail clearly on labels that do not fit the model: missing, unexpected, wrong shape, dtype or range. Float
    labels of shape (batch, num_classes) are class weights (G's interpolations between classes).

    The range check runs wherever a label out of range would otherwise reach an embedding: on the CPU, and on a GPU
    for a network in eval mode (sampling, evaluation, figures, `sagan.load`'s networks), where an index out of range
    is a device-side assert that kills the CUDA context and names nothing. It is skipped for a GPU network in training
    mode, where it would stall every step on a host sync (its labels come from the training data, checked when the
    dataset was built, and from the latent sampler), and inside torch.compile and torch.export, where a traced graph
    cannot branch on values.
    """
    if num_classes == 0:
        if y is not None:
            raise UserError("labels given to an unconditional model: build it with num_classes > 0 or pass y=None")
        return
    if y is None:
        raise UserError(f"this model is class-conditional ({num_classes} classes): pass labels y of shape ({batch},)")
    if y.is_floating_point():  # class weights, one row per sample (G only: interpolations between classes)
        if y.shape != (batch, num_classes):
            raise UserError(f"class weights must have shape ({batch}, {num_classes}), got {tuple(y.shape)}")
        return
    if y.shape != (batch,) or y.dtype != torch.long:
        raise UserError(f"labels must be an int64 tensor of shape ({batch},), got {tuple(y.shape)} {y.dtype}")
    if torch.compiler.is_compiling() or batch == 0 or (training and y.device.type != "cpu"):
        return
    low, high = torch.stack([y.min(), y.max()]).tolist()  # one host sync
    if low < 0 or high >= num_classes:
        raise UserError(f"labels must lie in [0, {num_classes}), got values from {low} to {high}")
