"""The SparK pretraining model: mask -> sparse encoder -> densify -> generated decoder -> loss."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from .._geometry import Geometry, compact, per_axis
from ..errors import SparsifyError
from ..masking import check_mask, num_visible, random_mask
from ._patches import mask_at, patchify, repeat_mask, unpatchify
from ._rank import check_rank
from .decoder import LightDecoder
from .densify import Densify, resolve_densify_norm
from .loss import LOSSES, PATCH_NORM_EPS, masked_mse_loss, masked_patch_loss, patch_statistics

__all__ = ["SparK", "hide_masked"]

_STATE_VERSION = 1
_REQUIRED_ENCODER_ATTRS = ("feature_channels", "feature_strides", "downsample_ratio", "in_chans")


#: What a batch of each spatial rank is called in messages.
_BATCH_SHAPES = {1: "a signal batch (B, C, L)", 2: "an image batch (B, C, H, W)", 3: "a volume batch (B, C, D, H, W)"}


def _spatial_dims(encoder: nn.Module) -> int:
    """The encoder's spatial rank; encoders (and pickles) from before N-d support are 2-D."""
    rank = getattr(encoder, "spatial_dims", 2)
    try:
        return check_rank(rank)
    except SparsifyError:
        raise SparsifyError(
            f"the encoder reports spatial_dims={rank!r}; SparK supports 1-D (signals), 2-D (images) and "
            "3-D (volumes, video) encoders"
        ) from None


def _encoder_geometry(encoder: nn.Module) -> tuple[int, tuple[int, ...], list[tuple[int, ...]], tuple[int, ...]]:
    """Check the encoder's attributes; return (rank, per-axis downsample ratio, per-axis strides
    finest -> coarsest, per-axis mask patch)."""
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
    rank = _spatial_dims(encoder)
    channels, strides = list(encoder.feature_channels), list(encoder.feature_strides)
    if len(channels) != len(strides) or not channels:
        raise SparsifyError(
            f"the encoder reports {len(channels)} feature channel counts and {len(strides)} strides; "
            "they must be equally long and non-empty"
        )
    try:
        ratio = per_axis(encoder.downsample_ratio, rank, "encoder.downsample_ratio")
        per_axis_strides = [per_axis(s, rank, "each of encoder.feature_strides") for s in strides]
        patch = per_axis(getattr(encoder, "patch_size", None) or ratio, rank, "encoder.patch_size")
    except SparsifyError as err:
        raise SparsifyError(
            f"{err} (the encoder is {rank}-D); an encoder's ratio, strides and patch need one entry per "
            "spatial axis, or one int for all"
        ) from None
    if ratio != per_axis_strides[-1]:
        raise SparsifyError(
            f"encoder.downsample_ratio ({encoder.downsample_ratio}) must equal its coarsest feature "
            f"stride ({strides[-1]})"
        )
    if any(r % p for r, p in zip(ratio, patch)):
        raise SparsifyError(
            f"encoder.patch_size {compact(patch)} must divide the downsample ratio {compact(ratio)} on every "
            "axis (a mask patch can be finer than the network's total stride, not coarser or misaligned)"
        )
    return rank, ratio, per_axis_strides, patch


def hide_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with every pixel of a masked patch set to exactly 0 (``mask``: bool (B, 1, *grid), True = visible).

    Uses ``torch.where``, not a multiply, so NaN or Inf inside a masked patch cannot leak out.
    """
    return torch.where(repeat_mask(mask.bool(), x.shape[2:]), x, torch.zeros((), dtype=x.dtype, device=x.device))


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


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: per-axis values as a checkpoint stores and compares them."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class SparK(nn.Module):
    """SparK masked pretraining around a sparse encoder from :func:`sparsify.wrap`.

    ``spark(x)`` draws a fresh random mask per sample (on ``x``'s device, no host synchronisation),
    encodes the visible patches sparsely, densifies every scale, decodes with a UNet-style decoder
    generated from the encoder's pyramid, and returns the scalar loss over the masked patches.

    Images, volumes and signals alike: the encoder's ``spatial_dims`` (1, 2 or 3) decides the rank of
    the densify layers, the decoder and the patches. Strides, the downsample ratio and the mask patch
    are per axis where the axes differ (a video stem's (1, 2, 2)), plain ints where they agree.

    Args:
        encoder: a sparse encoder (``sparsify.wrap(model, ...)``). Its parameters are the user's model's
            own, so training ``SparK`` trains the model in place.
        mask_ratio: fraction of patches masked in each sample, in (0, 1). 0.6 is the paper's default.
        decoder_width: decoder width at the coarsest scale; it halves at every upsampling step.
        densify_norm: normalisation applied to each scale before the mask token: ``"auto"`` (masked
            BatchNorm for BatchNorm networks, LayerNorm over channels otherwise), ``"batch"``,
            ``"layer"`` or ``"none"``.
        loss: ``"spark"`` (default): MSE against each masked patch normalised by its own mean and std;
            ``"mse"``: plain MSE against the unnormalised masked voxels (nnssl's 3-D SparK), the
            decoder then predicts in the input's units.

    Inputs must be (B, in_chans, *size) (H, W for images; D, H, W for volumes; L for signals) with
    every axis a multiple of ``downsample_ratio`` (R). Masks are bool (B, 1, *(size // P)), True =
    visible, where the patch P is the encoder's ``patch_size`` (R unless the encoder was wrapped with
    a finer mask patch); the loss is computed per patch P.
    """

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.6,
        decoder_width: int = 768,
        densify_norm: str | None = "auto",
        *,
        loss: str = "spark",
    ) -> None:
        super().__init__()
        rank, ratio, strides, patch = _encoder_geometry(encoder)
        if not isinstance(mask_ratio, (int, float)) or not 0.0 < float(mask_ratio) < 1.0:
            raise SparsifyError(
                f"mask_ratio must be a number in (0, 1), got {mask_ratio!r}; 0.6 is the default"
            )
        if loss not in LOSSES:
            raise SparsifyError(
                f"loss={loss!r} is not supported; use 'spark' (per-patch normalised, the default) or 'mse' "
                "(plain masked MSE)"
            )
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.loss = loss
        self.spatial_dims = rank
        self.in_chans = int(encoder.in_chans)
        self.downsample_ratio = compact(ratio)
        self.patch_size = compact(patch)
        self.feature_channels = [int(c) for c in encoder.feature_channels]
        self.feature_strides = [compact(s) for s in strides]
        # The sizes the encoder accepts: multiples of its size multiple (R, or more when a down-up
        # block inside a stage pools below R), which every stride of the pyramid divides.
        multiple = getattr(encoder, "size_multiple", None)
        self._size_geometry = Geometry(rank, per_axis(multiple, rank, "encoder.size_multiple")
                                       if multiple is not None else ratio)
        self._mask_geometry = Geometry(rank, patch)  # the mask grid and the loss patches
        self.densify_norm = resolve_densify_norm(densify_norm, getattr(encoder, "norm_type", None))
        self.decoder = LightDecoder(self.feature_strides, decoder_width, self.in_chans, rank)
        self.decoder_width = int(decoder_width)
        coarse_first = self.feature_channels[::-1]
        self.densify = nn.ModuleList(
            Densify(c, w, self.densify_norm, coarsest=i == 0, spatial_dims=rank)
            for i, (c, w) in enumerate(zip(coarse_first, self.decoder.skip_widths))
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, giving a SparK pickled before N-d support its 2-D defaults."""
        super().__setstate__(state)
        if "spatial_dims" not in state:
            ratio = per_axis(self.downsample_ratio, 2, "downsample_ratio")
            self.spatial_dims, self.loss, self.patch_size = 2, "spark", self.downsample_ratio
            self._size_geometry = self._mask_geometry = Geometry(2, ratio)

    # ----------------------------------------------------------------------------------- inputs
    def _check_input(self, x: torch.Tensor) -> tuple[int, ...]:
        """Check a batch; return its mask grid."""
        rank = self.spatial_dims
        if not isinstance(x, torch.Tensor) or x.dim() != rank + 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            hint = ""
            if isinstance(x, torch.Tensor) and x.dim() in (3, 4, 5):
                hint = (
                    f"; this encoder is {rank}-D, the batch is {x.dim() - 2}-D: wrap the network for "
                    f"{x.dim() - 2}-D inputs (sparsify.wrap(model, input_size=...) with {x.dim() - 2} sizes)"
                )
            raise SparsifyError(f"SparK expects {_BATCH_SHAPES[rank]}, got {shape}{hint}")
        if not x.is_floating_point():
            raise SparsifyError(
                f"SparK expects a floating-point {('signal', 'image', 'volume')[rank - 1]} batch, got dtype "
                f"{x.dtype}; use x.float()"
            )
        c, size = x.shape[1], tuple(x.shape[2:])
        if c != self.in_chans:
            raise SparsifyError(
                f"the input has {c} channels but the encoder was built for {self.in_chans}; create the model "
                f"with in_chans={c} (timm) or change its first conv, then wrap it again"
            )
        if not self._size_geometry.fits(size):
            fitting = Geometry.describe(self._size_geometry.nearest(size)[0])
            multiple = compact(self._size_geometry.patch)
            what = (f"the downsample ratio {self.downsample_ratio}" if multiple == self.downsample_ratio else
                    f"the encoder's size multiple {multiple} (downsample ratio {self.downsample_ratio}, but a block "
                    "inside a stage pools below it)")
            raise SparsifyError(
                f"input size {Geometry.describe(size)} is not a positive multiple of {what}; resize or crop to "
                f"e.g. {fitting}"
            )
        return self._mask_geometry.grid(size)

    def _check_explicit_mask(self, mask: torch.Tensor, x: torch.Tensor, grid: tuple[int, ...]) -> None:
        check_mask(mask, x.shape[0], grid)
        if mask.device != x.device:
            raise SparsifyError(
                f"mask is on {mask.device} but the input is on {x.device}; move it with .to()"
            )

    def draw_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh random mask for batch ``x``: bool (B, 1, *(size // P)) on x's device, True = visible.

        Each sample keeps exactly ``round(cells * (1 - mask_ratio))`` visible patches (at least one).
        Pass a ``torch.Generator`` on x's device for reproducible masks.
        """
        grid = self._check_input(x)
        num_patches = math.prod(grid)
        if max(1, num_visible(num_patches, self.mask_ratio)) >= num_patches:
            raise SparsifyError(
                f"mask_ratio={self.mask_ratio} masks no patch of a {Geometry.describe(grid)} patch grid, so "
                "there is nothing to reconstruct; use a larger input or a larger mask_ratio"
            )
        return random_mask(x.shape[0], grid, self.mask_ratio, generator=generator, device=x.device)

    # ---------------------------------------------------------------------------------- forward
    def predict(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, C, *size) for input ``x`` under ``mask``: in per-patch normalised units
        (``loss="spark"``) or in the input's units (``loss="mse"``).

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
        dense = [d(f, mask_at(mask, f.shape[2:])) for d, f in zip(self.densify, features[::-1])]
        return self.decoder(dense)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        check_mask: bool = True,
    ) -> torch.Tensor:
        """Scalar SparK loss on batch ``x`` (B, C, *size).

        Args:
            x: images (B, C, H, W), volumes (B, C, D, H, W) or signals (B, C, L), every axis a multiple
                of ``downsample_ratio``.
            mask: optional bool (B, 1, *(size // P)), True = visible (P = ``patch_size``). When omitted
                a fresh random mask is drawn per sample on x's device. An explicit mask must mask at
                least one patch in the batch; in eager mode that is checked (one host read), under
                ``torch.compile`` it is not.
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
        loss_fn = masked_mse_loss if self.loss == "mse" else masked_patch_loss
        return loss_fn(pred, x, mask, self.patch_size, check_nonempty=check)

    @torch.no_grad()
    def reconstruct(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """What the model reconstructs (no gradients; runs in the module's current mode).

        Returns a dict of (B, C, *size) tensors (images, volumes or signals, like ``x``) in the input's
        units: ``"input"``; ``"masked"`` (masked patches zeroed); ``"reconstruction"`` (the prediction;
        with the default loss denormalised with the *input's* own per-patch mean and std, for display
        only); ``"composite"`` (visible patches from the input, masked ones from the reconstruction);
        plus ``"mask"``, bool (B, 1, *size), True = visible. Call ``.eval()`` first to use running
        BatchNorm statistics and leave them untouched. :func:`save_reconstructions` draws it.
        """
        grid = self._check_input(x)
        if mask is None:
            mask = self.draw_mask(x, generator)
        pred = self.predict(x, mask).float()
        xf = x.float()
        p = self.patch_size
        pixel_mask = repeat_mask(mask, x.shape[2:])
        masked = hide_masked(xf, mask)
        if self.loss == "mse":
            recon = pred  # predicted in the input's units
        else:
            mean, std = _display_statistics(patchify(xf, p), patchify(masked, p), mask)
            recon = unpatchify(patchify(pred, p) * std + mean, p, self.in_chans, grid)
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
            "downsample_ratio": _plain(self.downsample_ratio),
            "feature_channels": list(self.feature_channels),
            "feature_strides": _plain(self.feature_strides),
            "decoder_width": self.decoder_width,
            "decoder_steps": _plain(self.decoder.steps),
            "densify_norm": self.densify_norm,
            "spatial_dims": self.spatial_dims,
            "patch_size": _plain(self.patch_size),
            "loss": self.loss,
        }

    def get_extra_state(self) -> dict[str, Any]:
        """The densify/decoder hyper-parameters, saved with the state_dict and checked on load."""
        return self._hyper_parameters()

    def set_extra_state(self, state: Any) -> None:
        """Refuse a state_dict saved from a SparK with different densify/decoder hyper-parameters."""
        if not isinstance(state, dict):
            raise SparsifyError(f"this SparK checkpoint's hyper-parameter record is malformed: {state!r}")
        # Checkpoints from before N-d support were 2-D, masked per downsample ratio, with SparK's loss.
        saved = {"spatial_dims": 2, "patch_size": state.get("downsample_ratio"), "loss": "spark"}
        saved.update({k: _plain(v) for k, v in state.items()})
        mine = self._hyper_parameters()
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r}, this model {v!r}"
            for k, v in mine.items()
            if k != "version" and saved.get(k) != v
        ]
        if diffs:
            raise SparsifyError(
                "this SparK state_dict was saved with different hyper-parameters ("
                + "; ".join(diffs)
                + "). Build SparK with the checkpoint's settings (same encoder, decoder_width, "
                "densify_norm and loss) before loading it."
            )

    def extra_repr(self) -> str:
        extra = "" if self.spatial_dims == 2 else f", spatial_dims={self.spatial_dims}"
        if self.patch_size != self.downsample_ratio:
            extra += f", patch_size={self.patch_size}"
        if self.loss != "spark":
            extra += f", loss={self.loss!r}"
        return (
            f"mask_ratio={self.mask_ratio}, downsample_ratio={self.downsample_ratio}, "
            f"densify_norm={self.densify_norm!r}, decoder_steps={self.decoder.steps}{extra}"
        )
