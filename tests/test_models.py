import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from sagan.models import Discriminator, Generator, SelfAttention2d, attention_gammas, attention_shares, spectral_sigmas
from sagan.models.layers import init_weights
from sagan.utils.errors import UserError

# The attention placements of the presets (conf/model/*.yaml), at tiny widths.
ATTN = {32: (16,), 64: (32,), 128: (32,), 256: (64,)}


def tiny(resolution: int, num_classes: int = 0, **kw) -> tuple[Generator, Discriminator]:
    attn = kw.pop("attn", ATTN[resolution])
    G = Generator(z_dim=16, ch=8, resolution=resolution, attn_resolutions=attn, num_classes=num_classes, **kw)
    D = Discriminator(ch=8, resolution=resolution, attn_resolutions=attn, num_classes=num_classes, **kw)
    return G, D


def explicit_attention(block: SelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The same maths with the (N x N/p^2) matrix written out, as most PyTorch SAGANs do it."""
    B, C, H, W = x.shape
    theta = block.query(x).flatten(2)  # (B, C/8, N)
    phi = F.max_pool2d(block.key(x), block.pool).flatten(2)  # (B, C/8, N/p^2)
    g = F.max_pool2d(block.value(x), block.pool).flatten(2)  # (B, C/2, N/p^2)
    beta = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)  # (B, N, N/p^2), no 1/sqrt(d)
    o = torch.bmm(g, beta.transpose(1, 2)).view(B, C // 2, H, W)
    return x + block.gamma * block.out(o)


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_output_shapes(resolution, num_classes):
    G, D = tiny(resolution, num_classes)
    y = torch.arange(3) % num_classes if num_classes else None
    x = G(torch.randn(3, 16), y)
    assert x.shape == (3, 3, resolution, resolution)
    assert x.abs().max() <= 1
    assert D(x, y).shape == (3,)


def test_bad_inputs_fail_clearly():
    G, D = tiny(32, num_classes=5)
    z, y = torch.randn(2, 16), torch.tensor([0, 1])
    with pytest.raises(UserError, match=r"z of shape \(B, 16\)"):
        G(torch.randn(2, 17), y)
    with pytest.raises(UserError, match="class-conditional"):
        G(z)
    with pytest.raises(UserError, match=r"in \[0, 5\)"):
        G(z, torch.tensor([0, 5]))
    with pytest.raises(UserError, match="D takes class indices"):
        D(torch.zeros(2, 3, 32, 32), torch.tensor([0.0, 1.0]))
    with pytest.raises(UserError, match=r"class weights must have shape \(2, 5\)"):
        G(z, torch.ones(2, 4) / 4)
    with pytest.raises(UserError, match=r"images of shape \(B, 3, 32, 32\)"):
        D(torch.zeros(2, 3, 64, 64), y)
    G0, _ = tiny(32)
    with pytest.raises(UserError, match="unconditional"):
        G0(z, y)


def test_bad_architecture_fails_clearly():
    with pytest.raises(UserError, match=r"no feature map of size \[64\].*\[8, 16, 32\]"):
        Generator(ch=8, resolution=32, attn_resolutions=(64,))
    with pytest.raises(UserError, match=r"no feature map of size \[32\].*\[8, 16\]"):
        Discriminator(ch=8, resolution=32, attn_resolutions=(32,))
    with pytest.raises(UserError, match="unsupported generator resolution 48"):
        Generator(resolution=48)
    with pytest.raises(UserError, match="divisible by 8"):
        SelfAttention2d(12)


def test_attention_placement_follows_resolutions():
    G, D = tiny(128, attn=(32, 64))
    names = list(G.blocks)
    assert names.index("attn32") == names.index("block2") + 1  # block2 produces 32x32
    assert names.index("attn64") == names.index("block3") + 1
    assert list(attention_gammas(D)) == ["blocks.attn64", "blocks.attn32"]  # D goes down in size
    x = G(torch.randn(2, 16))
    assert D(x).shape == (2,)


def test_zero_gamma_is_identity_but_gamma_learns():
    block = SelfAttention2d(16)
    assert block.gamma.item() == 0.0
    x = torch.randn(2, 16, 8, 8)
    y = block(x)
    assert torch.equal(y, x)
    (y * torch.randn_like(y)).sum().backward()
    assert block.gamma.grad is not None and block.gamma.grad.abs() > 0


@pytest.mark.parametrize("cond_bn", ["tables", "linear"])
def test_class_weights_mix_the_classes_gains_and_biases(cond_bn):
    G = Generator(z_dim=16, ch=8, resolution=32, attn_resolutions=(16,), num_classes=5, cond_bn=cond_bn).eval()
    for p in G.parameters():  # away from the initial tables (all gains 1, biases 0), so classes differ
        p.data.add_(0.1 * torch.randn_like(p))
    z, y = torch.randn(3, 16), torch.tensor([0, 2, 4])
    torch.testing.assert_close(G(z, F.one_hot(y, 5).float()), G(z, y))  # one-hot weights are the hard labels
    assert not torch.allclose(G(z, y), G(z, torch.tensor([1, 1, 1])))
    # Each conditional BatchNorm is affine in its gain and bias, so a 30/70 mixture of two classes' weights gives
    # 0.3 and 0.7 of their outputs (G as a whole is not linear in them).
    bn = G.blocks.block0.bn1
    h = torch.randn(3, bn.bn.num_features, 4, 4)
    mix = 0.3 * F.one_hot(torch.tensor([0, 0, 1]), 5).float() + 0.7 * F.one_hot(torch.tensor([3, 4, 4]), 5).float()
    expected = 0.3 * bn(h, torch.tensor([0, 0, 1])) + 0.7 * bn(h, torch.tensor([3, 4, 4]))
    torch.testing.assert_close(bn(h, mix), expected)


def test_attention_share_is_the_branch_norm_over_the_input_norm():
    G, D = tiny(32, attn=(16,))
    D.train()
    x = torch.randn(2, 3, 32, 32)
    u_before = {k: v.clone() for k, v in D.state_dict().items() if k.endswith("_u")}
    shares = attention_shares(D, lambda: D(x))
    assert set(shares) == {"blocks.attn16"} and shares["blocks.attn16"].item() == 0.0  # gamma starts at 0
    layer = D.blocks.attn16
    captured = {}
    layer.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    with torch.no_grad():
        layer.gamma.fill_(0.5)
        share = attention_shares(D, lambda: D(x))["blocks.attn16"]
        branch = layer.eval()(captured["x"]) - captured["x"]  # eval: the spectral norms' weights as the share used
        layer.train()
        torch.testing.assert_close(share, branch.norm() / captured["x"].norm())
        layer.gamma.fill_(1.0)
        torch.testing.assert_close(attention_shares(D, lambda: D(x))["blocks.attn16"], 2 * share)  # linear in gamma
    # Measured in eval mode (no spectral-norm power iteration), and D is left as it was.
    assert D.training and all(torch.equal(v, D.state_dict()[k]) for k, v in u_before.items())


@pytest.mark.parametrize("pool", [1, 2])
def test_sdpa_forward_matches_explicit_matrix(pool):
    torch.manual_seed(0)
    block = SelfAttention2d(32, pool=pool).eval()
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(3, 32, 8, 8)
    torch.testing.assert_close(block(x), explicit_attention(block, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", [1, 2])
def test_attention_maps_are_softmax_rows_that_match_forward(pool):
    torch.manual_seed(0)
    block = SelfAttention2d(32, pool=pool).eval()
    with torch.no_grad():
        block.gamma.fill_(1.3)
    x = torch.randn(2, 32, 8, 8)
    maps = block.attention_maps(x)
    assert maps.shape == (2, 64, 8 // pool, 8 // pool)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 64))
    # Rebuild the forward output from the maps: x + gamma * o(beta @ values).
    value = block.value(x)
    value = F.max_pool2d(value, pool) if pool > 1 else value
    attended = maps.flatten(2) @ value.flatten(2).transpose(1, 2)  # (B, N, C/2)
    o = attended.transpose(1, 2).reshape(2, 16, 8, 8)
    torch.testing.assert_close(block(x), x + block.gamma * block.out(o), atol=1e-5, rtol=1e-5)
    # Selected queries are the matching rows of the full set.
    some = block.attention_maps(x, queries=[(0, 0), (3, 5), (7, 7)])
    torch.testing.assert_close(some, maps[:, [0, 3 * 8 + 5, 63]])
    with pytest.raises(UserError, match="query positions"):
        block.attention_maps(x, queries=[(8, 0)])


def test_attention_scores_are_not_scaled():
    """The maps are the softmax of raw query-key products: a 1/sqrt(d) port (transformer habit) fails this."""
    torch.manual_seed(0)
    block = SelfAttention2d(32, pool=1, sn=False)
    x = torch.randn(1, 32, 6, 6)
    maps = block.attention_maps(x).flatten(2)
    logits = block.query(x).flatten(2).transpose(1, 2) @ block.key(x).flatten(2)
    torch.testing.assert_close(maps[0], torch.softmax(logits[0], dim=-1))


@pytest.mark.parametrize("init", ["xavier", "orthogonal", "normal"])
def test_spectral_norm_converges_to_one(init):
    torch.manual_seed(0)
    G, D = tiny(32, num_classes=3, init=init)
    for net in (G, D):
        net.train()
        x = torch.randn(4, 16) if net is G else torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            for _ in range(30):  # one power iteration per forward
                net(x, torch.tensor([0, 1, 2, 0]))
        checked = 0
        for m in net.modules():
            if parametrize.is_parametrized(m, "weight"):
                w = m.weight.detach().flatten(1)  # the normalised weight the layer uses
                sigma = torch.linalg.matrix_norm(w, ord=2)
                assert abs(sigma.item() - 1) < 0.05, (type(m).__name__, sigma.item())
                checked += 1
        assert checked == len(spectral_sigmas(net)) > 0


def test_every_conv_linear_embedding_is_normalised_and_switchable():
    G, D = tiny(32, num_classes=3)
    layers = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)
    for net in (G, D):
        assert all(parametrize.is_parametrized(m, "weight") for m in net.modules() if isinstance(m, layers))
    G_plain = Generator(z_dim=16, ch=8, resolution=32, sn=False)
    assert not any(parametrize.is_parametrized(m) for m in G_plain.modules())
    assert spectral_sigmas(G_plain) == {}


def test_readouts_are_named():
    G, D = tiny(64, num_classes=3)
    assert list(attention_gammas(G)) == ["blocks.attn32"]
    sigmas = spectral_sigmas(D)
    assert {"linear", "embed", "blocks.block0.conv1", "blocks.attn32.query"} <= set(sigmas)
    assert all(s.ndim == 0 and s > 0 for s in sigmas.values())


def test_init_schemes():
    conv = torch.nn.Conv2d(64, 64, 3)
    init_weights(conv, "normal")
    assert abs(conv.weight.std().item() - 0.02) < 0.002
    init_weights(conv, "orthogonal")
    w = conv.weight.flatten(1)
    torch.testing.assert_close(w @ w.T, torch.eye(64), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="unknown init scheme 'he'"):
        init_weights(conv, "he")


def test_deepcopy_after_forward():
    G, _ = tiny(32, num_classes=3)
    z, y = torch.randn(2, 16), torch.tensor([0, 2])
    G(z, y)
    G_ema = copy.deepcopy(G)
    G.eval(), G_ema.eval()
    assert torch.equal(G(z, y), G_ema(z, y))


def conv_and_linear_gflop(net: torch.nn.Module, *inputs) -> float:
    """Forward GFLOP per image of every conv and linear layer, from their shapes (1 multiply-add = 2 FLOP)."""
    macs = []

    def count(m, args, out):
        if isinstance(m, torch.nn.Conv2d):
            macs.append(out.numel() // out.shape[0] * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups)
        else:
            macs.append(m.in_features * m.out_features)

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net.eval()(*inputs)
    for h in hooks:
        h.remove()
    return 2 * sum(macs) / 1e9


@pytest.mark.slow
def test_model_stats_script_reports_the_cifar_preset():
    """The script's figures for sagan32: parameter counts exactly, GFLOP within 3% of the conv + linear count
    derived here (torch's FLOP counter also counts attention and pooling, differently across versions)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "model_stats.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    row = next(line.split() for line in out.splitlines() if line.startswith("sagan32"))
    G = Generator(ch=64, resolution=32, attn_resolutions=(16,))
    D = Discriminator(ch=64, resolution=32, attn_resolutions=(16,))
    params = [f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M" for net in (G, D)]
    assert row[:4] == ["sagan32", "32", *params] == ["sagan32", "32", "4.36M", "1.07M"]
    g_gflop = conv_and_linear_gflop(G, torch.zeros(1, 128))
    d_gflop = conv_and_linear_gflop(D, torch.zeros(1, 3, 32, 32))
    assert float(row[4]) == pytest.approx(g_gflop, rel=0.03) and float(row[5]) == pytest.approx(d_gflop, rel=0.03)
    assert g_gflop == pytest.approx(3.3, abs=0.1)  # the reference's 3.4 GFLOP model, not another one


def test_forward_uses_a_fused_kernel_on_cpu():
    """With the math path excluded, SDPA raises unless the inputs qualify for the flash kernel (equal head sizes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = SelfAttention2d(64)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        block(x).sum().backward()
    assert x.grad is not None
