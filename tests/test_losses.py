import torch

from sagan.training.losses import get_losses
from sagan.utils.errors import UserError

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_hinge_by_hand():
    d, g = get_losses("hinge")
    # relu(1 - [2, .5, -1]) = [0, .5, 2] -> 2.5/3 ; relu(1 + [-2, 0, 1.5]) = [0, 1, 2.5] -> 3.5/3
    assert torch.isclose(d(REAL, FAKE), torch.tensor(6.0 / 3))
    assert torch.isclose(g(FAKE), torch.tensor(0.5 / 3))


def test_nonsaturating_by_hand():
    d, g = get_losses("nonsaturating")
    sig = torch.sigmoid
    expected_d = -(torch.log(sig(REAL)).mean() + torch.log(1 - sig(FAKE)).mean())
    assert torch.isclose(d(REAL, FAKE), expected_d)
    assert torch.isclose(g(FAKE), -torch.log(sig(FAKE)).mean())


def test_wasserstein_by_hand():
    d, g = get_losses("wasserstein")
    assert torch.isclose(d(REAL, FAKE), torch.tensor(-0.5 / 3 - 1.5 / 3))
    assert torch.isclose(g(FAKE), torch.tensor(0.5 / 3))


def test_unknown_loss():
    import pytest

    with pytest.raises(UserError, match="unknown loss 'lsgan'"):
        get_losses("lsgan")
