"""The SparK pretraining model: mask -> sparse encoder -> densify -> generated decoder -> loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import SparsifyError
from ..masking import check_mask, num_visible, random_mask
from ._patches import patchify, repeat_mask, unpatchify
from .decoder import LightDecoder
from .densify import Densify, resolve_densify_norm
from .loss import PATCH_NORM_EPS, masked_patch_loss, patch_statistics

__all__ = ["SparK", "hide_masked"]

_STATE_VERSION = 1
_REQUIRED_ENCODER_ATTRS = ("feature_channels", "feature_strides", "downsample_ratio", "in_chans")


def _check_encoder(encoder: nn.Module) -> None:
    if not isinstance(encoder, nn.Module):
        raise SparsifyError(
            f"SparK needs a sparse encoder module, got {type(encoder).__name__}; build one with "
            "sparsify.wrap(model, input_size=(H, W))"
        )
    missing = [a for a in _REQUIRED_ENCODER_ATTRS if not hasattr(encoder, a)]
    if missing:
        raise SparsifyError(
            f"{type(encoder).__name__} is not a sparse encoder (it lacks {', '.join(missing)}); "
            "pass the result of sparsify.wrap(model, input_size=(H, W)), not the model itself"
        )
    channels, strides = list(encoder.feature_channels), list(encoder.feature_strides)
    if len(channels) != len(strides) or not channels:
        raise SparsifyError(
            f"the encoder reports {len(channels)} feature channel counts and {len(strides)} strides; "
            "they must be equally long and non-empty"
        )
    if int(encoder.downsample_ratio) != strides[-1]:
        raise SparsifyError(
            f"encoder.downsample_ratio ({encoder.downsample_ratio}) must equal its coarsest feature "
            f"stride ({strides[-1]})"
        )


def hide_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with every pixel of a masked patch set to exactly 0 (``mask``: bool (B, 1, h, w), True = visible).

    Uses ``torch.where``, not a multiply, so NaN or Inf inside a masked patch cannot leak out.
    """
    return torch.where(repeat_mask(mask.bool(), x.shape[-2:]), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _display_statistics(
    patches: torch.Tensor, visible_patches: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean/std used to show a prediction in pixel units (B, L, 1 each).

    A patch whose own statistics are not finite (NaN/Inf pixels in a masked patch) falls back to the
    statistics of the sample's visible pixels, so one bad patch does not blank the picture.
    """
    mean, std = patch_statistics(patches)
    vis = mask.flatten(1).to(patches.dtype).unsqueeze(-1)  # (B, L, 1), 1 = visible
    n = (vis.sum(1, keepdim=True) * patches.shape[-1]).clamp(min=2.0)
    v_mean = (visible_patches * vis).sum((1, 2), keepdim=True) / n
    v_var = (((visible_patches - v_mean) * vis).square()).sum((1, 2), keepdim=True) / (n - 1)
    v_std = (v_var + PATCH_NORM_EPS).sqrt()
    ok = torch.isfinite(mean) & torch.isfinite(std)
    return torch.where(ok, mean, v_mean), torch.where(ok, std, v_std)


class SparK(nn.Module):
    """SparK masked pretraining around a sparse encoder from :func:`sparsify.wrap`.

    ``spark(x)`` draws a fresh random mask per sample (on ``x``'s device, no host synchronisation),
    encodes the visible patches sparsely, densifies every scale, decodes with a UNet-style decoder
    generated from the encoder's pyramid, and returns the scalar loss over the masked patches.

    Args:
        encoder: a sparse encoder (``sparsify.wrap(model, ...)``). Its parameters are the user's model's
            own, so training ``SparK`` trains the model in place.
        mask_ratio: fraction of patches masked in each sample, in (0, 1). 0.6 is the paper's default.
        decoder_width: decoder width at the coarsest scale; it halves at every upsampling step.
        densify_norm: normalisation applied to each scale before the mask token: ``"auto"`` (masked
            BatchNorm for BatchNorm networks, LayerNorm over channels otherwise), ``"batch"``,
            ``"layer"`` or ``"none"``.

    Inputs must be (B, in_chans, H, W) with H and W multiples of ``downsample_ratio`` (R). Masks are
    bool (B, 1, H // R, W // R), True = visible.
    """

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.6,
        decoder_width: int = 768,
        densify_norm: str | None = "auto",
    ) -> None:
        super().__init__()
        _check_encoder(encoder)
        if not isinstance(mask_ratio, (int, float)) or not 0.0 < float(mask_ratio) < 1.0:
            raise SparsifyError(
                f"mask_ratio must be a number in (0, 1), got {mask_ratio!r}; 0.6 is the default"
            )
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.in_chans = int(encoder.in_chans)
        self.downsample_ratio = int(encoder.downsample_ratio)
        self.feature_channels = [int(c) for c in encoder.feature_channels]
        self.feature_strides = [int(s) for s in encoder.feature_strides]
        self.densify_norm = resolve_densify_norm(densify_norm, getattr(encoder, "norm_type", None))
        self.decoder = LightDecoder(self.feature_strides, decoder_width, self.in_chans)
        self.decoder_width = int(decoder_width)
        coarse_first = self.feature_channels[::-1]
        self.densify = nn.ModuleList(
            Densify(c, w, self.densify_norm, coarsest=i == 0)
            for i, (c, w) in enumerate(zip(coarse_first, self.decoder.skip_widths))
        )

    # ----------------------------------------------------------------------------------- inputs
    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise SparsifyError(f"SparK expects an image batch (B, C, H, W), got {shape}")
        if not x.is_floating_point():
            raise SparsifyError(
                f"SparK expects a floating-point image batch, got dtype {x.dtype}; use x.float()"
            )
        _, c, h, w = x.shape
        r = self.downsample_ratio
        if c != self.in_chans:
            raise SparsifyError(
                f"the input has {c} channels but the encoder was built for {self.in_chans}; create the model "
                f"with in_chans={c} (timm) or change its first conv, then wrap it again"
            )
        if h % r or w % r or h < r or w < r:
            raise SparsifyError(
                f"input size {h}x{w} is not a positive multiple of the downsample ratio {r}; resize or crop "
                f"to e.g. {max(r, h // r * r)}x{max(r, w // r * r)}"
            )
        return h // r, w // r

    def _check_explicit_mask(self, mask: torch.Tensor, x: torch.Tensor, grid: tuple[int, int]) -> None:
        check_mask(mask, x.shape[0], grid)
        if mask.device != x.device:
            raise SparsifyError(
                f"mask is on {mask.device} but the input is on {x.device}; move it with .to()"
            )

    def draw_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh random mask for batch ``x``: bool (B, 1, H // R, W // R) on x's device, True = visible.

        Each sample keeps exactly ``round(h * w * (1 - mask_ratio))`` visible patches (at least one).
        Pass a ``torch.Generator`` on x's device for reproducible masks.
        """
        grid = self._check_input(x)
        num_patches = grid[0] * grid[1]
        if max(1, num_visible(num_patches, self.mask_ratio)) >= num_patches:
            raise SparsifyError(
                f"mask_ratio={self.mask_ratio} masks no patch of a {grid[0]}x{grid[1]} patch grid, so "
                "there is nothing to reconstruct; use a larger image or a larger mask_ratio"
            )
        return random_mask(x.shape[0], grid, self.mask_ratio, generator=generator, device=x.device)

    # ---------------------------------------------------------------------------------- forward
    def predict(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, C, H, W) for input ``x`` under ``mask``, in per-patch normalised units.

        The encoder sees only the visible patches; the prediction does not depend on masked pixels.
        """
        grid = self._check_input(x)
        self._check_explicit_mask(mask, x, grid)
        # Select rather than multiply: 0 * NaN is NaN, so a non-finite pixel inside a masked patch
        # would otherwise reach every feature. Finite inputs give the same zeros as the encoder's own
        # input multiply, so results are unchanged.
        features = self.encoder(hide_masked(x, mask), mask)
        if len(features) != len(self.densify):
            raise SparsifyError(
                f"the encoder returned {len(features)} feature maps but reports {len(self.densify)} scales"
            )
        dense = [d(f, repeat_mask(mask, f.shape[-2:])) for d, f in zip(self.densify, features[::-1])]
        return self.decoder(dense)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        check_mask: bool = True,
    ) -> torch.Tensor:
        """Scalar SparK loss on batch ``x`` (B, C, H, W).

        Args:
            x: images, H and W multiples of ``downsample_ratio``.
            mask: optional bool (B, 1, H // R, W // R), True = visible. When omitted a fresh random mask
                is drawn per sample on x's device. An explicit mask must mask at least one patch in the
                batch; in eager mode that is checked (one host read), under ``torch.compile`` it is not.
            generator: optional ``torch.Generator`` for the random mask.
            check_mask: check that an explicit mask masks something (one host read, which stalls a GPU
                every step). Pass False for masks known to mask at least one patch (``draw_mask`` or
                ``random_mask`` with a ratio that masks one): the recipes do.
        """
        if mask is None:
            mask = self.draw_mask(x, generator)  # masks >= 1 patch per sample by construction
            check = False
        else:
            check = check_mask
        pred = self.predict(x, mask)
        return masked_patch_loss(pred, x, mask, self.downsample_ratio, check_nonempty=check)

    @torch.no_grad()
    def reconstruct(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Images showing what the model reconstructs (no gradients; runs in the module's current mode).

        Returns a dict of (B, C, H, W) tensors in the input's units: ``"input"``; ``"masked"`` (masked
        patches zeroed); ``"reconstruction"`` (the prediction denormalised with the *input's* own
        per-patch mean and std, for display only); ``"composite"`` (visible patches from the input,
        masked ones from the reconstruction); plus ``"mask"``, bool (B, 1, H, W), True = visible.
        Call ``.eval()`` first to use running BatchNorm statistics and leave them untouched.
        """
        grid = self._check_input(x)
        if mask is None:
            mask = self.draw_mask(x, generator)
        pred = self.predict(x, mask).float()
        xf = x.float()
        r = self.downsample_ratio
        pixel_mask = repeat_mask(mask, x.shape[-2:])
        masked = hide_masked(xf, mask)
        mean, std = _display_statistics(patchify(xf, r), patchify(masked, r), mask)
        recon = unpatchify(patchify(pred, r) * std + mean, r, self.in_chans, grid)
        return {
            "input": xf,
            "masked": masked,
            "reconstruction": recon,
            "composite": torch.where(pixel_mask, xf, recon),
            "mask": pixel_mask,
        }

    # ------------------------------------------------------------------------------ state dict
    def _hyper_parameters(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "in_chans": self.in_chans,
            "downsample_ratio": self.downsample_ratio,
            "feature_channels": list(self.feature_channels),
            "feature_strides": list(self.feature_strides),
            "decoder_width": self.decoder_width,
            "decoder_steps": list(self.decoder.steps),
            "densify_norm": self.densify_norm,
        }

    def get_extra_state(self) -> dict[str, Any]:
        """The densify/decoder hyper-parameters, saved with the state_dict and checked on load."""
        return self._hyper_parameters()

    def set_extra_state(self, state: Any) -> None:
        """Refuse a state_dict saved from a SparK with different densify/decoder hyper-parameters."""
        if not isinstance(state, dict):
            raise SparsifyError(f"this SparK checkpoint's hyper-parameter record is malformed: {state!r}")
        mine = self._hyper_parameters()
        diffs = [
            f"{k}: checkpoint {state.get(k)!r}, this model {v!r}"
            for k, v in mine.items()
            if k != "version" and state.get(k) != v
        ]
        if diffs:
            raise SparsifyError(
                "this SparK state_dict was saved with different hyper-parameters ("
                + "; ".join(diffs)
                + "). Build SparK with the checkpoint's settings (same encoder, decoder_width and "
                "densify_norm) before loading it."
            )

    def extra_repr(self) -> str:
        return (
            f"mask_ratio={self.mask_ratio}, downsample_ratio={self.downsample_ratio}, "
            f"densify_norm={self.densify_norm!r}, decoder_steps={self.decoder.steps}"
        )
