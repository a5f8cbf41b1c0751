"""BatchNorm over the global batch of several processes (`dist.sync_bn=true`), and back to plain BatchNorm."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks too (each rank's input reaches every rank's loss)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks, on any backend (NCCL or
    gloo, so also on CPU, where torch.nn.SyncBatchNorm does not run). Same parameters and buffers as BatchNorm2d.

    One all-reduce of the per-channel sums forward, one backward; outside training, or with one process, it is an
    ordinary BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()  # statistics in fp32 also under autocast
        local = torch.cat([xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3)), xf.new_full((1,), x.numel() / channels)])
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean.square()).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), momentum)  # unbiased, as BatchNorm
        y = (xf - mean[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y.to(x.dtype)


def use_sync_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d inside `module` by a SyncBatchNorm2d with the same state."""
    _replace_batchnorm(module, nn.BatchNorm2d, SyncBatchNorm2d)


def use_plain_batchnorm(module: nn.Module) -> None:
    """Replace every SyncBatchNorm2d inside `module` by a BatchNorm2d with the same state."""
    _replace_batchnorm(module, SyncBatchNorm2d, nn.BatchNorm2d)


def _replace_batchnorm(module: nn.Module, old: type, new: type) -> None:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is old:
                twin = new(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine)
                twin.load_state_dict(child.state_dict())
                twin.requires_grad_(any(p.requires_grad for p in child.parameters()))
                setattr(parent, name, twin.to(child.running_mean.device).train(child.training))
