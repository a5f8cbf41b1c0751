"""FID statistics of any number of images in constant memory: the count, mean and centred scatter of feature rows,
added batch by batch as features come out of the Inception network and reduced across processes once, at the end.

2,048 pool3 features per image make the scatter a 2048 x 2048 float64 matrix (32 MiB), whatever the number of images;
keeping the features themselves costs 8 KiB per image (10 GB for ImageNet's 1.28 million).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from sagan.utils.processes import World
from sagan.utils.errors import UserError


class FeatureMoments:
    """Count, mean (D,) and centred scatter (D, D) = sum over rows of (x - mean)(x - mean)^T, in float64, on the CPU.

    Each batch is centred on its own mean and merged with the pairwise update of Chan, Golub & LeVeque (1979):
    with d = mean_b - mean, mean += d n_b / n and scatter += scatter_b + d d^T n_a n_b / n. Summing raw x x^T instead
    would subtract two numbers of size N |mean|^2 to get one of size N sigma^2: for features like 1000 + noise that
    cancels 6 of float64's 16 digits. Here no large terms cancel, so the statistics agree with numpy's two-pass
    `np.cov` (what torch-fidelity uses) to rounding.
    """

    def __init__(self, dim: int = 2048) -> None:
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of feature rows (B, D), any float dtype."""
        if len(features) == 0:
            return
        rows = features.detach().to("cpu", torch.float64)
        batch_mean = rows.mean(0)
        centred = rows - batch_mean  # (B, D)
        self.scatter.addmm_(centred.T, centred)  # the batch's own scatter, in place: no second D x D matrix
        self._move_mean(len(rows), batch_mean)

    def _move_mean(self, count: int, mean: torch.Tensor) -> None:
        """The rest of Chan et al.'s update, once the scatter of `count` new rows about their own `mean` is added: the
        scatter between the two means, and the mean of all rows."""
        total = self.count + count
        delta = mean - self.mean
        self.scatter.addr_(delta, delta, alpha=self.count * count / total)
        self.mean.add_(delta, alpha=count / total)
        self.count = total

    def all_reduce(self, world: World) -> None:
        """Make these the moments of every process's rows together, on every process (nothing to do with one).

        Two collectives, once: the counts and sums (D + 1 numbers) give the global mean mu; then each process's
        scatter about mu, scatter_r + n_r (mean_r - mu)(mean_r - mu)^T (the parallel-axis theorem), summed over
        processes, is the scatter of all rows, with only non-negative terms added along the diagonal. CPU tensors:
        gloo, which every process group here has ("gloo", or "cpu:gloo,cuda:nccl").
        """
        if world.size == 1:
            return
        sums = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.mean * self.count])
        dist.all_reduce(sums)
        count = round(sums[0].item())  # exact: a count is far below 2^53
        mean = sums[1:] / max(count, 1)
        delta = self.mean - mean
        self.scatter.addr_(delta, delta, alpha=self.count)
        dist.all_reduce(self.scatter)
        self.count, self.mean = count, mean

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """mu (D,) and the unbiased covariance sigma (D, D) (divided by N - 1, like np.cov), float64."""
        if self.count < 2:
            raise UserError(f"FID statistics need at least 2 images, got {self.count}: use more reference images")
        return self.mean.numpy().copy(), (self.scatter / (self.count - 1)).numpy()
