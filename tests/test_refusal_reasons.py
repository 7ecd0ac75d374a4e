"""Refusal messages name the deciding reason on their first line (issue 17 item 10).

A conv-attention hybrid is refused for its attention; a channels-last norm in its stem (permute to
NHWC, LayerNorm, permute back) is an on-grid map with its dims reordered, not a stem that misses the
patch grid, and must not be reported as one. A genuinely unaligned stem (a convolution without
padding) is still reported, first when there is nothing else, after attention when both are there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.testing import assert_sparse_semantics


class ChannelsLastNorm(nn.Module):
    """LayerNorm over channels written as timm's LayerNorm2d is: permute, normalise, permute back."""

    def __init__(self, chans: int):
        super().__init__()
        self.norm = nn.LayerNorm(chans)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over the positions of a map, written by hand."""

    def __init__(self, chans: int, heads: int = 2, bias_tokens: int | None = None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(chans, 3 * chans)
        self.proj = nn.Linear(chans, chans)
        # a relative-position-style bias of fixed size: the model then runs at one input size only
        self.bias = nn.Parameter(torch.zeros(heads, bias_tokens, bias_tokens)) if bias_tokens else None

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        if self.bias is not None:
            a = a + self.bias
        t = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.proj(t).transpose(1, 2).reshape(b, c, h, w)


class Hybrid(nn.Module):
    """Conv stem with a channels-last norm, a conv stage, then attention (CoAtNet / EdgeNeXt-like)."""

    def __init__(self, pad: int = 1, attention: bool = True, bias_tokens: int | None = None):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4, padding=0) if pad else nn.Conv2d(3, 16, 5, stride=4)
        self.stem_norm = ChannelsLastNorm(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 2, stride=2)
        self.norm = ChannelsLastNorm(32)
        self.attn = Attention(32, bias_tokens=bias_tokens) if attention else nn.Identity()

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        x = x + F.gelu(self.conv(x))
        return self.attn(self.norm(self.down(x)))


def _refusal(model: nn.Module, size=(64, 64)) -> str:
    with pytest.raises(sparsify.SparsifyError) as info:
        sparsify.wrap(model, size)
    return str(info.value)


def test_hybrid_with_channels_last_stem_norm_is_refused_for_its_attention():
    text = _refusal(Hybrid())
    first = text.splitlines()[0]
    assert "attention over positions" in first, text
    assert "matmul" in first, text
    assert "never line up" not in text, text
    assert "node 'flatten'" in text, text  # the refused node is still named


def test_channels_last_stem_norm_alone_wraps_and_keeps_the_contract():
    torch.manual_seed(0)
    model = Hybrid(attention=False).double()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_sparse_semantics(model, x)


def test_unaligned_stem_alone_is_named_first():
    text = _refusal(Hybrid(pad=0, attention=False))
    assert "never line up with the patch grid" in text.splitlines()[0], text


def test_attention_before_an_unaligned_stem():
    text = _refusal(Hybrid(pad=0))
    lines = text.splitlines()
    assert "attention over positions" in lines[0], text
    assert "never line up" not in lines[0] and "never line up" in text, text


def test_fixed_size_attention_names_attention_first():
    # the bias table fits 64x64 only (8x8 tokens at stride 8): the second example size fails
    text = _refusal(Hybrid(bias_tokens=8 * 8), (64, 64))
    first = text.splitlines()[0]
    assert first.startswith("cannot wrap Hybrid.") and "attention over positions" in first, text
    assert "second input size" in text, text


@pytest.mark.slow
def test_timm_edgenext_is_refused_for_its_attention_not_its_stem_norm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("edgenext_xx_small", pretrained=False)
    text = _refusal(model, (128, 128))
    assert "attention over positions" in text.splitlines()[0], text
    assert "never line up" not in text, text


class PadCrop(nn.Module):
    """Pad to a multiple of a window, then crop back with sizes read from the input (DaViT, Swin)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.bn(self.conv(F.pad(x, (0, 1, 0, 1))))
        return y[:, :, :h, :w]


def test_crop_by_traced_sizes_is_not_a_train_eval_difference():
    # slice(None, h) holds a graph node; the train and eval graphs have equal nodes there, not a
    # mode-dependent value. The crop itself is refused, for what it is.
    text = _refusal(PadCrop(), (32, 32))
    assert "train" not in text.splitlines()[0] and "eval mode" not in text, text
    assert "slices or indexes a spatial dim" in text, text


class ChannelsLastInputThenUnpaddedStem(nn.Module):
    """A per-pixel colour transform in channels-last layout before an unpadded stem conv."""

    def __init__(self):
        super().__init__()
        self.colour = nn.Linear(3, 3)
        self.stem = nn.Conv2d(3, 16, 5, stride=4)
        self.conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.colour(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv(self.stem(x))


def test_unaligned_stem_behind_a_channels_last_input_transform_is_named():
    text = _refusal(ChannelsLastInputThenUnpaddedStem())
    assert "never line up with the patch grid: node 'stem'" in text.splitlines()[0], text


class ReflectPadded(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blur = nn.Conv2d(8, 8, 3, stride=2, groups=8)

    def forward(self, x):
        return self.blur(F.pad(F.relu(self.stem(x)), (1, 1, 1, 1), mode="reflect"))


def test_first_line_names_the_first_refused_node_and_why():
    first = _refusal(ReflectPadded(), (32, 32)).splitlines()[0]
    assert "node 'pad'" in first and "reflect padding" in first, first


class TokenTransformer(nn.Module):
    """A patch embedding and attention over the tokens, returning tokens (no map at a final stride)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, stride=8)
        self.attn = Attention(16)

    def forward(self, x):
        return self.attn(self.embed(x)).flatten(2).mean(-1)


def test_transformer_without_a_final_map_is_refused_for_its_attention():
    text = _refusal(TokenTransformer(), (32, 32))
    assert "attention over positions" in text.splitlines()[0], text
