"""Step 5 of the pipeline: ``sparsify.wrap`` and the :class:`SparseEncoder` it returns."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import sparsify.adapters  # noqa: F401  (registers the built-in rules)
from sparsify.adapters.batch_norm import BATCH_NORM_FUNCTIONS
from sparsify.adapters.group_norm import masked_group_norm, masked_group_norm_fn

from ._grid import check_total_stride, unaligned_stem
from ._model_link import share_modules, stage_modules
from .analyse import analyse, eval_mode, record_shapes
from .errors import SparsifyError
from .masking import check_mask
from .modes import live_mode_flags
from .rewrite import build_dense_graph, build_sparse_graph
from .stages import GraphNode, Stage, describe_nodes, discover_stages
from .trace import module_path, trace
from .train_branches import cut_training_branches

__all__ = ["wrap", "SparseEncoder", "graph_node_names"]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise SparsifyError(f"input_size must be an int or (H, W) of ints, got {size!r}")
    if min(pair) <= 0:
        raise SparsifyError(f"input_size must be positive, got {size!r}; pass e.g. input_size=(224, 224)")
    return (int(pair[0]), int(pair[1]))


def _first_conv_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise SparsifyError("could not infer the number of input channels (no nn.Conv2d found); "
                        "pass in_chans=... to sparsify.wrap")


def _infer_in_chans(model: nn.Module, gm: fx.GraphModule, size: tuple[int, int]) -> tuple[int, dict]:
    """The input channels and the example shapes at ``size``.

    The first convolution's input channels, unless a space-to-depth stem (pixel_unshuffle, a
    reshape-permute, timm SpaceToDepth) comes before it and multiplies the channels by k * k: then
    the count the graph actually runs with, the first of c / k^2 for k = 2, 3, ... """
    first = _first_conv_channels(model)
    candidates = [first] + [first // (k * k) for k in range(2, 17) if first % (k * k) == 0]
    error: SparsifyError | None = None
    for chans in candidates:
        try:
            return chans, record_shapes(gm, _example(model, chans, size))
        except SparsifyError as e:
            error = error or e
    # Every candidate failed: the first conv's count failed for another reason, so report that run.
    raise error if error is not None else SparsifyError("could not infer in_chans; pass in_chans=...")


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


def _trace_checked(model, leaf_modules, autowrap_functions, tracer_kwargs, concrete_args=None
                   ) -> fx.GraphModule:
    """Trace in train and eval mode; a graph that depends on the mode would silently freeze it.

    Arguments that are ``self.training`` become live reads of the owning module's flag
    (:mod:`sparsify.modes`); anything else that differs between the modes is refused.
    """
    with _train_mode(model):
        train_gm = trace(model, leaf_modules, autowrap_functions, tracer_kwargs, concrete_args)
    with eval_mode(model):
        eval_gm = trace(model, leaf_modules, autowrap_functions, tracer_kwargs, concrete_args)
    a, b = _signature(train_gm), _signature(eval_gm)
    cut = cut_training_branches(train_gm, eval_gm) if a != b else None
    if cut is not None:  # train mode only adds branches (aux heads) that the eval computation never reads
        train_gm, a = cut, _signature(cut)
    if a != b and _attention_report(eval_gm):
        raise SparsifyError(f"cannot wrap {type(model).__name__}." + _attention_report(eval_gm))
    if a != b:
        index = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
        node = list(train_gm.graph.nodes)[min(index, len(a) - 1)]
        where = module_path(node) or "<top level>"
        # Never suggest the root model itself as a leaf: nothing would be left to rewrite.
        fix = ("Pass leaf_modules=[<that module's class>] to keep it whole and register an adapter for it "
               "(sparsify.register_adapter)." if where != "<top level>" else
               f"The branch is in {type(model).__name__}.forward itself: move the mode-dependent code into a "
               "submodule (then keep it whole with leaf_modules=[...] and an adapter), or pass self.training "
               "as an argument to the function it calls (arguments are read live).")
        raise SparsifyError(
            f"the traced graph of {type(model).__name__} differs between train and eval mode, first at "
            f"node '{node.name}' in module '{where}' (Python code that branches on self.training). The "
            f"encoder would be frozen in one mode. {fix}"
        )
    live_mode_flags(train_gm, eval_gm, type(model).__name__, model)
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
        stages: list of :class:`sparsify.Stage` records (node name, stride, channels, and the module
            path whose output the stage is, if any).
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
        self._stage_modules: list[str | None] = [None] * len(stages)  # module returning each stage
        self._forward_kwargs: dict[str, Any] = {}  # the fixed extra forward arguments
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
    def source_model(self) -> nn.Module | None:
        """The model this encoder was made from (ground truth for :func:`sparsify.verify`), if known."""
        return self.__dict__.get("_source_model")

    def train(self, mode: bool = True) -> SparseEncoder:
        _set_mode(self, self.source_model, mode)
        return self

    def __getstate__(self) -> dict:
        # The generated forward is a function of a class fx made on the fly: pickle can't name it.
        # Pickle the graph instead and generate the forward again on load.
        state = self.__dict__.copy()
        state.pop("_forward_impl", None)
        for key in ("_sparse_graph", "_dense_graph"):
            state[key] = _detached(state[key])
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._forward_impl = type(fx.GraphModule(self._root, self._sparse_graph, "SparseEncoder")).forward

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
            check_mask(mask, x.shape[0], grid, x.device)
        return self._forward_impl(self._root, x, mask)

    def dense_encoder(self) -> nn.Module:
        """The unmodified network cut at the same stages (shared parameters, no masking)."""
        dense = _DenseEncoder(fx.GraphModule(self._root, self._dense_graph, "DenseEncoder"))
        object.__setattr__(dense, "_source_model", self.source_model)
        return dense

    def extra_repr(self) -> str:
        pyramid = ", ".join(f"{s.module or s.name}@{s.stride}:{s.channels}" for s in self.stages)
        return f"model={self.model_name}, R={self.downsample_ratio}, stages=[{pyramid}]"


class _DenseEncoder(nn.Module):
    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        _adopt(self, gm)
        self._forward_impl = type(gm).forward
        self._graph = gm.graph

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._forward_impl(self._root, x)

    def train(self, mode: bool = True) -> _DenseEncoder:
        _set_mode(self, self.__dict__.get("_source_model"), mode)
        return self

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_forward_impl", None)
        state["_graph"] = _detached(state["_graph"])
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._forward_impl = type(fx.GraphModule(self._root, self._graph, "DenseEncoder")).forward


def _detached(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` without its owning GraphModule (pickling that would re-trace it)."""
    return copy.deepcopy(graph) if graph.owning_module is not None else graph


def _set_mode(owner: nn.Module, source: nn.Module | None, mode: bool) -> None:
    """Switch ``owner`` to train/eval mode the way the user's model switches itself.

    A model may override ``train()`` to keep parts frozen (a stem BatchNorm held in eval mode while the
    rest trains, as detection backbones do): that method runs, every module of the encoder takes the
    flag of the model's module at the same path, and the model's modules that the encoder does not use
    (its root, the removed head) get their own flags back.
    """
    nn.Module.train(owner, mode)
    flags = {path: mode for path, _ in owner._root.named_modules()}
    if source is not None:
        before = [(m, m.training) for m in source.modules()]
        source.train(mode)
        flags.update((path, m.training) for path, m in source.named_modules() if path in flags)
        used = set(owner._root.modules())
        for m, flag in before:
            if m not in used:
                m.training = flag
    # The generated forward runs on ``_root``: a root model's own ``self.training`` reads its flag.
    for path, module in owner._root.named_modules():
        module.training = flags[path]


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
        if name.startswith("_tensor_constant"):
            # A tensor made in forward from Python values (torch.tensor([...])): part of the code, not of
            # the model's state, so the encoder's state_dict still loads strictly into the model.
            owner._non_persistent_buffers_set.add(name)
    root = nn.Module()
    root._modules = owner._modules
    root._parameters = owner._parameters
    root._buffers = owner._buffers
    root.training = owner.training
    object.__setattr__(owner, "_root", root)


def _example(model: nn.Module, in_chans: int, size: tuple[int, int]) -> torch.Tensor:
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, in_chans, *size, generator=gen).to(device=device, dtype=dtype)


def wrap(model: nn.Module, input_size: int | Sequence[int] = (224, 224), stages: str | Sequence[str] = "auto",
         *, in_chans: int | None = None, leaf_modules: Iterable[type] = (),
         autowrap_functions: Iterable[Callable] = (), tracer_kwargs: dict[str, Any] | None = None,
         concrete_args: dict[str, Any] | None = None) -> SparseEncoder:
    """Turn an unmodified CNN into a mask-aware sparse encoder.

    Args:
        model: any torch.fx-traceable network (timm, torchvision or your own). It is not modified;
            the encoder shares its modules and parameters.
        input_size: example (H, W) used for tracing and stage discovery only; at run time any H, W
            that are multiples of the downsample ratio work.
        stages: "auto" (the end of each stage, one per stride from 4 up; for a model returning a
            list/tuple/dict of maps, those maps) or the stages to return, finest to coarsest, each a
            graph node name or a module name (that module's output; see :func:`graph_node_names`).
            Everything after the last stage is cut away.
        in_chans: input channels (default: the first Conv2d's in_channels, divided by k * k when a
            space-to-depth stem comes before it).
        leaf_modules: module classes to keep whole when tracing (each needs an adapter if it
            touches space; see :func:`sparsify.register_adapter`).
        autowrap_functions: functions to keep as single calls when tracing.
        tracer_kwargs: extra ``torch.fx.Tracer`` arguments.
        concrete_args: values for ``forward`` arguments after the image, e.g.
            ``{"return_features": False}``; arguments with defaults are traced at their defaults.
            Either way they are fixed in the encoder.

    Raises:
        SparsifyError: untraceable model, unsupported operations (all listed), bad sizes or stages.
    """
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"sparsify.wrap expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, (SparseEncoder, _DenseEncoder)) or isinstance(getattr(model, "encoder", None),
                                                                        SparseEncoder):
        raise SparsifyError(f"{type(model).__name__} is already made by sparsify.wrap; wrap the original model "
                            "(the encoder shares its weights), or use the encoder as it is")
    size_a = _pair(input_size)
    size_b = (size_a[0] * 2, size_a[1] * 2)
    gm = _trace_checked(model, tuple(leaf_modules), tuple(autowrap_functions), tracer_kwargs, concrete_args)
    if in_chans:
        shapes_a = record_shapes(gm, _example(model, in_chans, size_a))
    else:
        in_chans, shapes_a = _infer_in_chans(model, gm, size_a)
    try:
        shapes_b = record_shapes(gm, _example(model, in_chans, size_b))
    except SparsifyError as error:
        raise SparsifyError(
            f"{type(model).__name__} does not run at a second input size {size_b[0]}x{size_b[1]} (sparsify "
            "runs two sizes to tell feature maps from fixed-size tensors)." + _attention_report(gm)
            + f"\nDetails: {error}") from error
    names = None if stages == "auto" else list(stages)
    if isinstance(stages, str) and stages != "auto":
        raise SparsifyError(f"stages must be 'auto' or a list of node or module names, got {stages!r}")
    try:
        chosen = discover_stages(gm, shapes_a, shapes_b, size_a, size_b, names)
    except SparsifyError as error:
        check_total_stride(model, gm, in_chans, size_a, error, names)
        raise
    ratio = chosen[-1][1].stride
    if size_a[0] % ratio or size_a[1] % ratio:
        check_total_stride(model, gm, in_chans, size_a, None, names)
        raise SparsifyError(f"input_size {size_a} is not a multiple of the network's downsample ratio "
                            f"{ratio}; pass input_size as a multiple of {ratio}")

    # Analyse and rewrite only what the stages need: the head is cut away first.
    cut = fx.GraphModule(gm, build_dense_graph(gm, [n for n, _ in chosen]), type(model).__name__)
    cut_nodes = {n.name: n for n in cut.graph.nodes}
    cut_outputs = [cut_nodes[s.name] for _, s in chosen]
    by_name = {n.name: n for n in gm.graph.nodes}
    cut_shapes_a = {n: shapes_a.get(by_name.get(n.name)) for n in cut.graph.nodes}
    cut_shapes_b = {n: shapes_b.get(by_name.get(n.name)) for n in cut.graph.nodes}
    try:
        analysis = analyse(cut, cut_shapes_a, cut_shapes_b, size_a, size_b, ratio, cut_outputs)
    except SparsifyError as error:
        stem = unaligned_stem(cut, cut_shapes_a, cut_shapes_b, size_a, size_b, cut_outputs)
        if stem:
            raise SparsifyError(f"{type(model).__name__}: {stem}\n{error}") from error
        raise
    sparse_graph = build_sparse_graph(cut, analysis, cut_outputs, cut_shapes_a, cut_shapes_b)
    sparse_gm = fx.GraphModule(cut, sparse_graph, "Sparse" + type(model).__name__)
    share_modules(sparse_gm, model)
    dense_graph = build_dense_graph(cut, cut_outputs)
    enc = SparseEncoder(sparse_gm, dense_graph, [s for _, s in chosen], in_chans, size_a,
                        _norm_type(sparse_gm), type(model).__name__)
    enc._stage_modules = stage_modules(gm, [n for n, _ in chosen])
    enc._forward_kwargs = dict(gm.meta.get("concrete_args", {}))
    object.__setattr__(enc, "_source_model", model)
    return enc


def graph_node_names(model: nn.Module, input_size: int | Sequence[int] = (224, 224), *,
                     in_chans: int | None = None, leaf_modules: Iterable[type] = ()) -> list[GraphNode]:
    """Every node of the traced model: candidates for ``stages=[...]``.

    Each row is a :class:`sparsify.stages.GraphNode` ``(name, stride, shape, module, stage)``: the node
    name, its stride (None unless an (N, C, H, W) map scaling with the input), its shape at
    ``input_size``, the module it belongs to, and ``stage``: its index in the pyramid that
    ``stages="auto"`` chooses (None for every other node).
    """
    size_a = _pair(input_size)
    size_b = (size_a[0] * 2, size_a[1] * 2)
    gm = trace(model, tuple(leaf_modules))
    if in_chans:
        shapes_a = record_shapes(gm, _example(model, in_chans, size_a))
    else:
        in_chans, shapes_a = _infer_in_chans(model, gm, size_a)
    shapes_b = record_shapes(gm, _example(model, in_chans, size_b))
    return describe_nodes(gm, shapes_a, shapes_b, size_a, size_b)
