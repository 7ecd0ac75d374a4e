"""Hand-written networks for issue 17 items 1 and 3: attention pooling over positions (global-context
blocks) and normalisations computed by hand over groups and space (EvoNorm).

Written the way model code spells them: sizes read from ``x.shape``, functional calls, a temperature
buffer, flags chosen in ``__init__``, a dict output, odd padding; plus the real timm models of the
same families (smallest variants, ``pretrained=False``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PATTERNS", "REAL", "GlobalContextNet", "EvoNormSNet", "EvoNormB0Net", "HandEvoNormB0Net"]


class _GlobalContext(nn.Module):
    """A global-context block: one logit per site, softmax over every site, the weighted sum of the
    features transformed and added back (and, with ``gate``, a sigmoid gate like timm's 'gca')."""

    def __init__(self, c: int, gate: bool, tokens: bool):
        super().__init__()
        self.attn = nn.Conv2d(c, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(c, c // 4, 1), nn.LayerNorm([c // 4, 1, 1]), nn.ReLU(inplace=True),
                                       nn.Conv2d(c // 4, c, 1))
        self.gate = nn.Conv2d(c, c, 1) if gate else None
        self.tokens = tokens
        self.register_buffer("temperature", torch.tensor(0.7))

    def forward(self, x):
        b, c, h, w = x.shape
        logits = self.attn(x).view(b, 1, h * w) / self.temperature
        if self.tokens:  # tokens (B, N, C) and an einsum, as transformer-minded code writes it
            weights = logits.softmax(dim=-1)
            tokens = x.flatten(2).transpose(1, 2)
            context = torch.einsum("bnc,bkn->bc", tokens, weights).view(b, c, 1, 1)
        else:
            weights = F.softmax(logits, dim=2).unsqueeze(-1)  # (B, 1, N, 1)
            context = torch.matmul(x.view(b, 1, c, h * w), weights).view(b, c, 1, 1)
        out = x + self.transform(context)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(context))
        return out


class GlobalContextNet(nn.Module):
    """GCNet-like: an odd-padded stem, residual stages with global-context blocks; returns a dict."""

    def __init__(self, in_chans: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 5, stride=2, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.gc1 = _GlobalContext(width, gate=False, tokens=False)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(4, 2 * width)
        self.gc2 = _GlobalContext(2 * width, gate=True, tokens=True)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        s1 = F.relu(x + self.gc1(self.conv1(x)))
        y = F.silu(self.gn(self.down(s1)))
        s2 = y + self.gc2(y)
        return {"stride2": s1, "stride4": s2}


def _group_std(x: torch.Tensor, groups: int, eps: float, flat: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    if flat:
        g = x.reshape(b, groups, -1)
        std = g.float().var(dim=-1, unbiased=False, keepdim=True).add(eps).sqrt().to(x.dtype)
        return std.expand(g.shape).reshape(b, c, h, w)
    g = x.reshape(b, groups, c // groups, h, w)
    var, _ = torch.var_mean(g, dim=(2, 3, 4), correction=0, keepdim=True)
    return var.add(eps).sqrt().expand_as(g).reshape(b, c, h, w)


class _EvoNormS0(nn.Module):
    """EvoNorm-S0 by hand: x * sigmoid(v x) / group_std(x) * weight + bias."""

    def __init__(self, c: int, groups: int, flat: bool, eps: float = 1e-5):
        super().__init__()
        self.groups, self.flat, self.eps = groups, flat, eps
        self.weight = nn.Parameter(torch.ones(1, c, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.v = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        x = x * torch.sigmoid(self.v * x) / _group_std(x, self.groups, self.eps, self.flat)
        return x * self.weight + self.bias


class _InstanceStdAct(nn.Module):
    """EvoNorm-B0's right-hand side alone: x / max(eps, v x + instance std), std via x.std."""

    def __init__(self, c: int):
        super().__init__()
        self.v = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        std = torch.std(x, dim=(-2, -1), keepdim=True, unbiased=False)
        return x / (x * self.v[None, :, None, None] + std + 1e-3).clamp_min(1e-3)


class _GroupNormByHand(nn.Module):
    """The GroupNorm paper's code: view(n, g, -1), normalise over each group, view back, affine."""

    def __init__(self, c: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, self.groups, -1)
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True)
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(n, c, h, w) * self.gamma + self.beta


class EvoNormSNet(nn.Module):
    """A small CNN normalised with hand-written EvoNorm-S0 (both group_std spellings), an instance-std
    activation and a hand-written GroupNorm."""

    def __init__(self, in_chans: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, stride=2, padding=1)
        self.n1 = _EvoNormS0(width, groups=4, flat=True)
        self.conv = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.n2 = _EvoNormS0(2 * width, groups=8, flat=False)
        self.act = _InstanceStdAct(2 * width)
        self.out = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=(1, 1))
        self.gn = _GroupNormByHand(2 * width, groups=4)

    def forward(self, x):
        x = self.n1(self.stem(x))
        x = self.act(self.n2(self.conv(x)))
        return F.silu(self.gn(self.out(x)))


class EvoNormB0Net(nn.Module):
    """A small CNN with timm's EvoNorm-B0 (batch variance, running variance in eval) and S0a."""

    def __init__(self, in_chans: int = 3, width: int = 16):
        super().__init__()
        from timm.layers import EvoNorm2dB0, EvoNorm2dS0a

        self.stem = nn.Conv2d(in_chans, width, 3, stride=2, padding=1)
        self.b0 = EvoNorm2dB0(width)
        self.conv = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.s0a = EvoNorm2dS0a(2 * width, group_size=8)

    def forward(self, x):
        return self.s0a(self.conv(self.b0(self.stem(x))))


class HandEvoNormB0Net(nn.Module):
    """EvoNorm-B0 written by hand with ``if self.training:``: refused (its train and eval graphs
    differ), with the module named and the fix (keep it whole and register an adapter)."""

    def __init__(self, in_chans: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, stride=2, padding=1)
        self.v = nn.Parameter(torch.ones(1, width, 1, 1))
        self.register_buffer("running_var", torch.ones(1, width, 1, 1))
        self.out = nn.Conv2d(width, width, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.stem(x)
        if self.training:
            var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
            self.running_var.mul_(0.9).add_(0.1 * var.detach())
        else:
            var = self.running_var
        x = x / torch.maximum((var + 1e-3).sqrt(), x * self.v + x.std(dim=(2, 3), keepdim=True))
        return self.out(x)


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


PATTERNS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("global_context_net", GlobalContextNet, (32, 48)),
    ("evonorm_s_net", EvoNormSNet, (32, 48)),
    ("evonorm_b0_net", EvoNormB0Net, (32, 48)),
]

REAL: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("gcresnet33ts", _timm("gcresnet33ts"), (64, 64)),
    ("test_efficientnet_evos", _timm("test_efficientnet_evos"), (64, 64)),
]
