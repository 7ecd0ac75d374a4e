"""Step 5 of the pipeline: ``sparsify.wrap`` and the :class:`SparseEncoder` it returns."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import sparsify.adapters  # noqa: F401  (registers the built-in rules)
from sparsify.adapters.batch_norm import BATCH_NORM_FUNCTIONS
from sparsify.adapters.group_norm import masked_group_norm, masked_group_norm_fn

from .analyse import analyse, eval_mode, record_shapes
from .errors import SparsifyError
from .masking import check_mask
from .rewrite import build_dense_graph, build_sparse_graph
from .stages import Stage, discover_stages, node_stride
from .trace import module_path, trace

__all__ = ["wrap", "SparseEncoder", "graph_node_names"]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise SparsifyError(f"input_size must be an int or (H, W), got {size!r}")
    return (int(size[0]), int(size[1]))


def _infer_in_chans(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise SparsifyError("could not infer the number of input channels (no nn.Conv2d found); "
                        "pass in_chans=... to sparsify.wrap")


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _signature(gm: fx.GraphModule) -> list[tuple[str, str, str]]:
    return [(n.op, str(n.target), n.name) for n in gm.graph.nodes]


def _trace_checked(model, leaf_modules, autowrap_functions, tracer_kwargs) -> fx.GraphModule:
    """Trace in train and eval mode; a graph that depends on the mode would silently freeze it."""
    with _train_mode(model):
        train_gm = trace(model, leaf_modules, autowrap_functions, tracer_kwargs)
    with eval_mode(model):
        eval_gm = trace(model, leaf_modules, autowrap_functions, tracer_kwargs)
    a, b = _signature(train_gm), _signature(eval_gm)
    if a != b and _attention_report(eval_gm):
        raise SparsifyError(f"cannot wrap {type(model).__name__}." + _attention_report(eval_gm))
    if a != b:
        index = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
        node = list(train_gm.graph.nodes)[min(index, len(a) - 1)]
        where = module_path(node) or "<top level>"
        raise SparsifyError(
            f"the traced graph of {type(model).__name__} differs between train and eval mode, first at "
            f"node '{node.name}' in module '{where}' (Python code that branches on self.training). The "
            "encoder would be frozen in one mode. Pass leaf_modules=[<that module's class>] to keep it whole "
            "and register an adapter for it (sparsify.register_adapter)."
        )
    return eval_gm


_ATTENTION_TARGETS = {F.scaled_dot_product_attention, torch.matmul, torch.bmm, torch.einsum, torch.baddbmm,
                      F.multi_head_attention_forward, "matmul", "bmm", "__matmul__"}


def _attention_report(gm: fx.GraphModule) -> str:
    """A sentence naming attention-like nodes (matmul between activations, SDPA), or ''."""
    import operator

    modules = dict(gm.named_modules())
    hits = []
    for node in gm.graph.nodes:
        target = node.target
        is_attention = (target in _ATTENTION_TARGETS or target is operator.matmul
                        or (node.op == "call_module" and isinstance(modules.get(target), nn.MultiheadAttention)))
        if is_attention:
            hits.append(f"'{node.name}' in module '{module_path(node) or '<top level>'}'")
    if not hits:
        return ""
    shown = ", ".join(hits[:6]) + (f" and {len(hits) - 6} more" if len(hits) > 6 else "")
    return (f" The model uses attention over positions ({shown}). Attention mixes every position with "
            "every other, so masked patches cannot be treated as absent: sparsify supports convolutional "
            "networks; for a hybrid model pass stages=[...] ending before the first attention block.")


def _norm_type(gm: fx.GraphModule) -> str | None:
    counts = {"batch": 0, "layer": 0, "group": 0}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_module":
            m = modules.get(target)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                counts["batch"] += 1
            elif isinstance(m, nn.LayerNorm):
                counts["layer"] += 1
            elif isinstance(m, nn.GroupNorm):
                counts["group"] += 1
        elif node.op == "call_function":
            if target is F.batch_norm or target in BATCH_NORM_FUNCTIONS:
                counts["batch"] += 1
            elif target in (F.layer_norm,):
                counts["layer"] += 1
            elif target in (F.group_norm, masked_group_norm, masked_group_norm_fn):
                counts["group"] += 1
    best = max(counts, key=counts.get)
    return best if counts[best] else None


class SparseEncoder(nn.Module):
    """A mask-aware encoder made from an unmodified CNN by :func:`wrap`.

    ``enc(x, mask)`` returns the stage features (finest to coarsest), each exactly zero at masked
    sites; statistics (BatchNorm, GroupNorm, global pooling, ...) see active sites only. The encoder
    shares the wrapped model's Module, Parameter and buffer objects under the same state_dict names.

    Attributes:
        stages: list of :class:`sparsify.stages.Stage` records (name, stride, channels).
        feature_channels / feature_strides: per stage, finest to coarsest.
        downsample_ratio: the final stride R, which is also the mask patch size.
        in_chans: input channels. input_size: the size used for tracing.
        norm_type: "batch", "layer", "group" or None, the network's dominant normalisation.
    """

    def __init__(self, sparse_gm: fx.GraphModule, dense_graph: fx.Graph, stages: list[Stage],
                 in_chans: int, input_size: tuple[int, int], norm_type: str | None, model_name: str):
        super().__init__()
        _adopt(self, sparse_gm)
        self._forward_impl: Callable[..., list[torch.Tensor]] = type(sparse_gm).forward
        self._sparse_graph = sparse_gm.graph
        self._sparse_code = sparse_gm.code
        self._dense_graph = dense_graph
        self._stage_records = list(stages)
        self.in_chans = in_chans
        self.input_size = input_size
        self.norm_type = norm_type
        self.model_name = model_name

    @property
    def stages(self) -> list[Stage]:
        return self._stage_records

    @property
    def feature_channels(self) -> list[int]:
        return [s.channels for s in self.stages]

    @property
    def feature_strides(self) -> list[int]:
        return [s.stride for s in self.stages]

    @property
    def downsample_ratio(self) -> int:
        return self.stages[-1].stride

    @property
    def code(self) -> str:
        """The generated Python source of the mask-aware forward (for inspection)."""
        return self._sparse_code

    @property
    def graph(self) -> fx.Graph:
        return self._sparse_graph

    def mask_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) patch grid for an input of this size; SparsifyError if it does not fit."""
        r = self.downsample_ratio
        if height % r or width % r or height <= 0 or width <= 0:
            raise SparsifyError(
                f"input size {height}x{width} is not a multiple of the downsample ratio {r} of "
                f"{self.model_name}; use sizes like {max(r, height // r * r)}x{max(r, width // r * r)}")
        return height // r, width // r

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Features finest to coarsest; ``mask`` is bool (B, 1, H // R, W // R), True = visible."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise SparsifyError(f"expected an image batch (B, C, H, W), got "
                                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_chans:
            raise SparsifyError(f"expected {self.in_chans} input channels, got {x.shape[1]}; wrap a model "
                                f"built for {x.shape[1]} channels (e.g. timm's in_chans=...)")
        grid = self.mask_grid(x.shape[2], x.shape[3])
        if mask is not None:
            check_mask(mask, x.shape[0], grid)
        return self._forward_impl(self._root, x, mask)

    def dense_encoder(self) -> nn.Module:
        """The unmodified network cut at the same stages (shared parameters, no masking)."""
        return _DenseEncoder(fx.GraphModule(self._root, self._dense_graph, "DenseEncoder"))

    def extra_repr(self) -> str:
        pyramid = ", ".join(f"{s.name}@{s.stride}:{s.channels}" for s in self.stages)
        return f"model={self.model_name}, R={self.downsample_ratio}, stages=[{pyramid}]"


class _DenseEncoder(nn.Module):
    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        _adopt(self, gm)
        self._forward_impl = type(gm).forward

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._forward_impl(self._root, x)


def _adopt(owner: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``owner`` the graph module's children, parameters and buffers (same objects, same names).

    The generated forward runs against ``owner._root``, a bare module sharing the same registries,
    so a child called e.g. ``stages`` (timm ConvNeXt) cannot clash with the encoder's own attributes.
    """
    for name, child in gm.named_children():
        owner._modules[name] = child
    for name, p in gm.named_parameters(recurse=False):
        owner._parameters[name] = p
    for name, b in gm.named_buffers(recurse=False):
        owner._buffers[name] = b
    root = nn.Module()
    root._modules = owner._modules
    root._parameters = owner._parameters
    root._buffers = owner._buffers
    object.__setattr__(owner, "_root", root)


def _example(model: nn.Module, in_chans: int, size: tuple[int, int]) -> torch.Tensor:
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, in_chans, *size, generator=gen).to(device=device, dtype=dtype)


def wrap(model: nn.Module, input_size: int | Sequence[int] = (224, 224), stages: str | Sequence[str] = "auto",
         *, in_chans: int | None = None, leaf_modules: Iterable[type] = (),
         autowrap_functions: Iterable[Callable] = (), tracer_kwargs: dict[str, Any] | None = None
         ) -> SparseEncoder:
    """Turn an unmodified CNN into a mask-aware sparse encoder.

    Args:
        model: any torch.fx-traceable network (timm, torchvision or your own). It is not modified;
            the encoder shares its modules and parameters.
        input_size: example (H, W) used for tracing and stage discovery only; at run time any H, W
            that are multiples of the downsample ratio work.
        stages: "auto" or the graph node names to return, finest to coarsest
            (see :func:`graph_node_names`). Everything after the last stage is cut away.
        in_chans: input channels (default: the first Conv2d's in_channels).
        leaf_modules: module classes to keep whole when tracing (each needs an adapter if it
            touches space; see :func:`sparsify.register_adapter`).
        autowrap_functions: functions to keep as single calls when tracing.
        tracer_kwargs: extra ``torch.fx.Tracer`` arguments.

    Raises:
        SparsifyError: untraceable model, unsupported operations (all listed), bad sizes or stages.
    """
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"sparsify.wrap expects an nn.Module, got {type(model).__name__}")
    size_a = _pair(input_size)
    size_b = (size_a[0] * 2, size_a[1] * 2)
    in_chans = in_chans or _infer_in_chans(model)
    gm = _trace_checked(model, tuple(leaf_modules), tuple(autowrap_functions), tracer_kwargs)
    shapes_a = record_shapes(gm, _example(model, in_chans, size_a))
    try:
        shapes_b = record_shapes(gm, _example(model, in_chans, size_b))
    except SparsifyError as error:
        raise SparsifyError(
            f"{type(model).__name__} does not run at a second input size {size_b[0]}x{size_b[1]} (sparsify "
            "runs two sizes to tell feature maps from fixed-size tensors)." + _attention_report(gm)
            + f"\nDetails: {error}") from error
    names = None if stages == "auto" else list(stages)
    if isinstance(stages, str) and stages != "auto":
        raise SparsifyError(f"stages must be 'auto' or a list of node names, got {stages!r}")
    chosen = discover_stages(gm, shapes_a, shapes_b, size_a, size_b, names)
    ratio = chosen[-1][1].stride
    if size_a[0] % ratio or size_a[1] % ratio:
        raise SparsifyError(f"input_size {size_a} is not a multiple of the network's downsample ratio "
                            f"{ratio}; pass input_size as a multiple of {ratio}")

    # Analyse and rewrite only what the stages need: the head is cut away first.
    cut = fx.GraphModule(gm, build_dense_graph(gm, [n for n, _ in chosen]), type(model).__name__)
    cut_nodes = {n.name: n for n in cut.graph.nodes}
    cut_outputs = [cut_nodes[s.name] for _, s in chosen]
    by_name = {n.name: n for n in gm.graph.nodes}
    cut_shapes_a = {n: shapes_a.get(by_name.get(n.name)) for n in cut.graph.nodes}
    cut_shapes_b = {n: shapes_b.get(by_name.get(n.name)) for n in cut.graph.nodes}
    analysis = analyse(cut, cut_shapes_a, cut_shapes_b, size_a, size_b, ratio, cut_outputs)
    sparse_graph = build_sparse_graph(cut, analysis, cut_outputs, cut_shapes_a, cut_shapes_b)
    sparse_gm = fx.GraphModule(cut, sparse_graph, "Sparse" + type(model).__name__)
    dense_graph = build_dense_graph(cut, cut_outputs)
    return SparseEncoder(sparse_gm, dense_graph, [s for _, s in chosen], in_chans, size_a,
                         _norm_type(sparse_gm), type(model).__name__)


def graph_node_names(model: nn.Module, input_size: int | Sequence[int] = (224, 224), *,
                     in_chans: int | None = None, leaf_modules: Iterable[type] = ()
                     ) -> list[tuple[str, int | None, tuple[int, ...] | None]]:
    """(node name, stride or None, example shape) for every node: candidates for ``stages=[...]``."""
    size_a = _pair(input_size)
    size_b = (size_a[0] * 2, size_a[1] * 2)
    in_chans = in_chans or _infer_in_chans(model)
    gm = trace(model, tuple(leaf_modules))
    shapes_a = record_shapes(gm, _example(model, in_chans, size_a))
    shapes_b = record_shapes(gm, _example(model, in_chans, size_b))
    return [(n.name, node_stride(shapes_a.get(n), shapes_b.get(n), size_a, size_b),
             tuple(shapes_a[n]) if isinstance(shapes_a.get(n), torch.Size) else None)
            for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
