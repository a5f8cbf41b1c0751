"""Every model.attn_type: identity at init, shape, gradient to gamma, deepcopy, spectral norm, bf16, maps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from sagan.config import ModelConfig
from sagan.models import AttentionLayer, SelfAttention2d, attention_gammas, build_models
from sagan.models.attention_types import ATTN_TYPES, build_attention
from sagan.visualization.figures import capture_attention_inputs, render_attention
from sagan.utils.errors import UserError

HEADS = {"multihead": 2}
MAPS = {"sagan": 1, "multihead": 2, "simple": 1, "local": 1, "cbam": 1, "se": 0, "residual": 0}


def layer(kind: str, channels: int = 32, **kw) -> AttentionLayer:
    return build_attention(kind, channels, pool=2, heads=HEADS.get(kind, 1), window=3, **{"sn": True, **kw})


def randomise(module: nn.Module) -> None:
    """Random non-zero values in every parameter (gamma included), so each layer does something."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if name == "gamma" else 0.2))


@pytest.mark.parametrize("kind", ATTN_TYPES)
def test_identity_at_init_then_gamma_learns(kind):
    torch.manual_seed(0)
    block, x = layer(kind), torch.randn(2, 32, 8, 8)
    assert torch.equal(block(x), x)  # gamma starts at exactly 0
    block(x).square().sum().backward()
    assert block.gamma.grad is not None and block.gamma.grad.abs() > 0  # ... and gets a gradient
    with torch.no_grad():
        block.gamma.fill_(0.5)
    y = block(x)
    assert y.shape == x.shape and not torch.allclose(y, x)


@pytest.mark.parametrize("kind", ATTN_TYPES)
def test_spectral_norm_on_every_weight_and_deepcopy(kind):
    block = layer(kind)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    x = torch.randn(2, 32, 8, 8)
    randomise(block)
    block.eval()
    twin = copy.deepcopy(block)
    assert torch.equal(twin(x), block(x))
    assert all(not parametrize.is_parametrized(m, "weight") for m in layer(kind, sn=False).modules())


@pytest.mark.parametrize("kind", ATTN_TYPES)
def test_networks_train_with_every_type_under_bf16(kind):
    cfg = OmegaConf.structured(ModelConfig(g_ch=8, d_ch=8, attn_type=kind, attn_heads=HEADS.get(kind, 1)))
    G, D = build_models(cfg, num_classes=0)
    assert set(attention_gammas(G)) == {"blocks.attn16"} and set(attention_gammas(D)) == {"blocks.attn16"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = capture_attention_inputs(G, lambda: G(torch.randn(4, cfg.z_dim)))
        images = G(torch.randn(4, cfg.z_dim))
        logits = D(images)
    if MAPS[kind]:
        assert inputs["blocks.attn16"].dtype == torch.bfloat16
    logits.mean().backward()
    assert G.blocks.attn16.gamma.grad is not None and D.blocks.attn16.gamma.grad is not None


def test_one_head_is_the_sagan_block_and_heads_split_its_widths():
    torch.manual_seed(1)
    x = torch.randn(2, 64, 8, 8)
    one, two = SelfAttention2d(64, heads=1, sn=False).eval(), SelfAttention2d(64, heads=2, sn=False).eval()
    randomise(one)
    two.load_state_dict(one.state_dict())  # the same weights: heads only split the widths
    # heads=1 is the paper's block: one softmax over all C/8 query/key channels, written out in full.
    q, k = one.query(x).flatten(2), F.max_pool2d(one.key(x), 2).flatten(2)
    v = F.max_pool2d(one.value(x), 2).flatten(2)
    beta = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
    expected = x + one.gamma * one.out((v @ beta.transpose(1, 2)).view(2, 32, 8, 8))
    torch.testing.assert_close(one(x), expected, rtol=1e-4, atol=1e-5)
    # Two heads: channels [0, 4) of q/k and [0, 16) of v form head 0, the rest head 1.
    heads = []
    for h in range(2):
        qh, kh, vh = q[:, 4 * h : 4 * h + 4], k[:, 4 * h : 4 * h + 4], v[:, 16 * h : 16 * h + 16]
        beta_h = torch.softmax(qh.transpose(1, 2) @ kh, dim=-1)
        heads.append(vh @ beta_h.transpose(1, 2))
        torch.testing.assert_close(two.attention_maps(x, head=h).flatten(2), beta_h, rtol=1e-4, atol=1e-6)
    expected_two = x + two.gamma * two.out(torch.cat(heads, 1).view(2, 32, 8, 8))
    torch.testing.assert_close(two(x), expected_two, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(two(x), one(x))


@pytest.mark.parametrize("kind", ["simple", "local"])
def test_maps_are_the_softmax_rows_forward_uses(kind):
    """Replacing the value by the identity (one channel per position) turns the layer's output into its maps."""
    torch.manual_seed(2)
    x = torch.randn(1, 32, 6, 6)
    block = layer(kind, sn=False).eval()
    randomise(block)
    maps = block.attention_maps(x)  # (1, 36, 6, 6): every query
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(1, 36))
    if kind == "local":  # nothing outside the 3x3 window around the query
        assert maps[0, 0, 2:, :].abs().max() == 0 and maps[0, 0, :, 2:].abs().max() == 0
        assert maps[0, 14].reshape(6, 6)[1:4, 1:4].sum().item() == pytest.approx(1.0, abs=1e-5)  # query (2, 2)
    # forward's mixing of values equals the maps applied to the values
    value = block.value(x).flatten(2)  # (1, C', 36)
    mixed = torch.einsum("bqk,bck->bcq", maps.flatten(2), value).view(1, -1, 6, 6)
    out = mixed if kind == "simple" else block.out(mixed)
    torch.testing.assert_close(block(x), x + block.gamma * out, rtol=1e-4, atol=1e-5)


def test_cbam_map_is_its_spatial_gate():
    torch.manual_seed(3)
    block = layer("cbam", sn=False).eval()
    randomise(block)
    x = torch.randn(2, 32, 8, 8)
    maps = block.attention_maps(x, queries=[(0, 0), (7, 7)])
    assert maps.shape == (2, 2, 8, 8) and torch.equal(maps[:, 0], maps[:, 1])
    _, gate = block._gates(x)
    assert torch.equal(maps[:, 0], gate[:, 0]) and 0 < gate.min() and gate.max() < 1


def test_figures_name_every_head_and_skip_layers_without_maps():
    torch.manual_seed(4)
    for kind, names in (("multihead", {"G_attn16_h0", "G_attn16_h1"}), ("se", set()), ("local", {"G_attn16"})):
        cfg = OmegaConf.structured(ModelConfig(g_ch=8, d_ch=8, attn_type=kind, attn_heads=HEADS.get(kind, 1)))
        G, _ = build_models(cfg, num_classes=0)
        z = torch.randn(2, cfg.z_dim)
        figures = render_attention(G, lambda: G(z), G(z).detach(), [(3, 3)], "G")
        assert set(figures) == names


def test_parameter_counts_are_comparable():
    """The residual control spends exactly as many weights as the SAGAN block (plus gamma each)."""
    count = lambda kind: sum(p.numel() for p in layer(kind, channels=64, sn=False).parameters())  # noqa: E731
    assert count("residual") == count("sagan") == 1.25 * 64 * 64 + 1
    assert count("multihead") == count("sagan")


def test_bad_settings_fail_clearly():
    with pytest.raises(UserError, match="unknown model.attn_type 'nonlocal'"):
        build_attention("nonlocal", 32, pool=2, heads=1, window=3, sn=False)
    with pytest.raises(UserError, match="needs model.attn_type=multihead"):
        build_attention("sagan", 32, pool=2, heads=2, window=3, sn=False)
    with pytest.raises(UserError, match="3 heads do not split"):
        build_attention("multihead", 32, pool=2, heads=3, window=3, sn=False)
    with pytest.raises(UserError, match="odd number"):
        build_attention("local", 32, pool=2, heads=1, window=4, sn=False)



def test_local_relative_positions_steer_the_window():
    """With query and key weights at 0, the logits are q . r only: a row embedding that matches the query for one row
    offset puts the weight there, for every query that has that neighbour."""
    from sagan.models.local_attention import LocalSelfAttention2d

    block = LocalSelfAttention2d(32, window=5, sn=False).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
        block.query.weight[:, 0, 0, 0] = 1.0  # the query is channel 0 of x, on every query/key channel
        block.rel_rows[:, 4] = 20.0  # the last row of the window: offset +2
    x = torch.zeros(1, 32, 8, 8)
    x[:, 0] = 1.0
    maps = block.attention_maps(x, queries=[(1, 3), (4, 6)])
    # All the weight two rows below each query, spread evenly over the window's 5 columns there.
    assert maps[0, 0, 3].sum().item() == pytest.approx(1.0, abs=1e-6) and maps[0, 1, 6].sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(maps[0, 0, 3, 1:6], torch.full((5,), 0.2))
    with torch.no_grad():
        block.rel_rows.zero_()
        block.rel_cols[:, 0] = 20.0  # the first column of the window: offset -2
    maps = block.attention_maps(x, queries=[(1, 3)])
    torch.testing.assert_close(maps[0, 0, :, 1], torch.tensor([1 / 4] * 4 + [0.0] * 4))  # rows 0-3 (clipped window)


def test_local_attention_on_a_map_smaller_than_its_window():
    block = layer("local", sn=False).eval()  # window 3 here; 7 on a 2x2 map below
    wide = build_attention("local", 32, pool=2, heads=1, window=7, sn=False).eval()
    randomise(wide)
    x = torch.randn(2, 32, 2, 2)
    maps = wide.attention_maps(x)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 4))
    assert wide(x).shape == x.shape and block(x).shape == x.shape
