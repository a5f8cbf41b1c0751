"""`model.attn_type`: which attention layer G and D place at the feature-map sizes of model.g_attn / model.d_attn."""

from __future__ import annotations

from sagan.models.attention import AttentionLayer, SelfAttention2d, SimpleSelfAttention2d
from sagan.models.gates import CBAM2d, SqueezeExcite2d
from sagan.models.local_attention import LocalSelfAttention2d
from sagan.models.residual_control import ResidualControl2d
from sagan.utils.errors import UserError

ATTN_TYPES = ("sagan", "multihead", "simple", "local", "se", "cbam", "residual")


def check_attention(kind: str, heads: int) -> None:
    if kind not in ATTN_TYPES:
        raise UserError(f"unknown model.attn_type '{kind}': choose one of {', '.join(ATTN_TYPES)}")
    if heads != 1 and kind != "multihead":
        raise UserError(f"model.attn_heads={heads} needs model.attn_type=multihead (attn_type is '{kind}')")


def build_attention(kind: str, channels: int, *, pool: int, heads: int, window: int, sn: bool) -> AttentionLayer:
    """One attention layer of type `kind` for a `channels`-wide feature map (see conf/model/*.yaml for the meanings)."""
    check_attention(kind, heads)
    if kind in ("sagan", "multihead"):
        return SelfAttention2d(channels, pool=pool, heads=heads, sn=sn)
    if kind == "simple":
        return SimpleSelfAttention2d(channels, sn=sn)
    if kind == "local":
        return LocalSelfAttention2d(channels, window=window, sn=sn)
    if kind == "se":
        return SqueezeExcite2d(channels, sn=sn)
    if kind == "cbam":
        return CBAM2d(channels, sn=sn)
    return ResidualControl2d(channels, sn=sn)
