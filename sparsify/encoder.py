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
from sparsify.adapters.group_norm import GROUP_NORM_FUNCTIONS

from ._geometry import Geometry, compact, per_axis
from ._grid import check_total_stride, unaligned_stem
from ._model_link import share_modules, stage_modules
from .analyse import analyse, eval_mode, record_shapes
from .errors import SparsifyError
from .masking import check_mask
from .modes import live_mode_flags
from .rewrite import build_dense_graph, build_sparse_graph
from .stages import GraphNode, Stage, describe_nodes, discover_stages
from .trace import check_trace_matches, explain_trace_failure, module_path, trace
from .train_branches import cut_training_branches

__all__ = ["wrap", "SparseEncoder", "graph_node_names"]


_SIZE_FORMS = {1: "(L,)", 2: "(H, W)", 3: "(D, H, W)"}
_SIZE_EXAMPLES = {1: "(512,)", 2: "(224, 224)", 3: "(16, 64, 64)"}


def _is_conv(module: object) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd)


_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


def _first_conv_in_graph(model: nn.Module, gm: fx.GraphModule) -> nn.Module | None:
    """The first convolution module the input reaches, in graph order (a module call, or a functional
    conv reading a conv module's weight as timm's weight-standardised convs do), or None."""
    # The model's own modules: the traced graph holds only stubs for modules whose weights it reads.
    modules = dict(model.named_modules())
    reached: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if not reached:  # the input is the first placeholder; later ones are extra arguments
                reached.add(node)
            continue
        if not any(a in reached for a in node.all_input_nodes):
            continue
        reached.add(node)
        if node.op == "call_module" and _is_conv(modules.get(node.target)):
            return modules[node.target]
        if node.op == "call_function" and node.target in _CONV_FUNCTIONS:
            # The module whose weight it reads, directly or standardised first (timm's StdConv2d);
            # None when no conv module owns it (the caller falls back), never a later convolution.
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            todo, seen = [weight] if isinstance(weight, fx.Node) else [], set()
            while todo:
                w = todo.pop()
                if w in seen or w in reached:
                    continue
                seen.add(w)
                if w.op == "get_attr":
                    owner = modules.get(str(w.target).rpartition(".")[0])
                    if _is_conv(owner):
                        return owner
                todo.extend(w.all_input_nodes)
            return None
    return None


def _first_conv(model: nn.Module, gm: fx.GraphModule | None = None) -> nn.Module | None:
    """The first convolution the model's input reaches (transposed convolutions are not counted).

    From the traced graph ``gm`` when given (graph order from the input, so an image network's Conv2d
    stem decides even when its ECA blocks hold more Conv1d than it has Conv2d); otherwise, or when the
    graph holds no convolution module, the first registered convolution of the model's majority rank.
    """
    if gm is not None:
        found = _first_conv_in_graph(model, gm)
        if found is not None:
            return found
    convs = [m for m in model.modules() if _is_conv(m)]
    if not convs:
        return None
    ranks = [len(m.kernel_size) for m in convs]
    dominant = max(dict.fromkeys(ranks), key=ranks.count)  # ties: the rank seen first
    return next(m for m in convs if len(m.kernel_size) == dominant)


def _spatial_rank(model: nn.Module, size: int | Sequence[int], gm: fx.GraphModule | None = None) -> int:
    """The spatial rank of the input: from ``input_size`` when it is a sequence, else from the first
    convolution the input reaches (Conv1d, Conv2d, Conv3d), else 2. The traced graph then runs at that
    rank."""
    conv = _first_conv(model, gm)
    conv_rank = len(conv.kernel_size) if conv is not None else None
    if isinstance(size, (tuple, list)):
        rank = len(size)
        if conv_rank is not None and rank != conv_rank and rank in _SIZE_FORMS:
            raise SparsifyError(
                f"{type(model).__name__} is a {conv_rank}-D network (its first convolution is "
                f"{type(conv).__name__}) but input_size {tuple(size)} has {rank} spatial dimension"
                f"{'s' if rank != 1 else ''}; pass input_size as {_SIZE_FORMS.get(conv_rank, 'one size per axis')}, "
                f"e.g. {_SIZE_EXAMPLES.get(conv_rank, '')}")
        return rank
    return conv_rank or 2


def _input_size(size: int | Sequence[int], rank: int) -> tuple[int, ...]:
    """``input_size`` as one positive int per spatial axis (an int is used for every axis)."""
    values = (size,) * rank if isinstance(size, int) and not isinstance(size, bool) else (
        tuple(size) if isinstance(size, (tuple, list)) else None)
    form = _SIZE_FORMS.get(rank, "a tuple")
    if values is None or not values or len(values) > 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SparsifyError(f"input_size must be an int or {form} of ints, got {size!r}")
    if min(values) <= 0:
        raise SparsifyError(f"input_size must be positive, got {size!r}; pass e.g. "
                            f"input_size={_SIZE_EXAMPLES.get(rank, '(224, 224)')}")
    return tuple(int(v) for v in values)


def _first_conv_channels(model: nn.Module, gm: fx.GraphModule | None = None) -> int:
    conv = _first_conv(model, gm)
    if conv is not None:
        return conv.in_channels
    raise SparsifyError("could not infer the number of input channels (no convolution found); "
                        "pass in_chans=... to sparsify.wrap")


def in_chans_candidates(first_conv_channels: int, rank: int) -> list[int]:
    """The input channel counts a network whose first convolution takes ``first_conv_channels`` may run
    on, most likely first: that count, then c / k^rank (k = 2 .. 16) for a space-to-depth stem before
    it (pixel_unshuffle, a reshape-permute, timm's SpaceToDepth)."""
    blocks = [k**rank for k in range(2, 17)]
    return [first_conv_channels] + [first_conv_channels // b for b in blocks if first_conv_channels % b == 0]


def _infer_in_chans(model: nn.Module, gm: fx.GraphModule, size: tuple[int, ...]) -> tuple[int, dict]:
    """The input channels and the example shapes at ``size``.

    The first convolution's input channels, unless a space-to-depth stem (pixel_unshuffle, a
    reshape-permute, timm SpaceToDepth) comes before it and multiplies the channels by k ** rank: then
    the count the graph actually runs with, the first of c / k^rank for k = 2, 3, ... """
    error: SparsifyError | None = None
    for chans in in_chans_candidates(_first_conv_channels(model, gm), len(size)):
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


def _attention_first(model: nn.Module, gm: fx.GraphModule, error: SparsifyError) -> SparsifyError:
    """``error``, after a first line naming the model's attention when it has any: a transformer that
    fails at the example size or has no map at the final stride is refused for its attention."""
    attention = _attention_report(gm)
    if not attention:
        return error
    return SparsifyError(f"cannot wrap {type(model).__name__}.{attention}\nAlso: {error}")


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
            elif target is F.group_norm or target in GROUP_NORM_FUNCTIONS:
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
        feature_channels / feature_strides: per stage, finest to coarsest (each stride an int when
            every axis agrees, else one int per axis).
        downsample_ratio: the final stride R (an int, or one per axis where they differ): the stride of
            the maps the network ends with, not of a down-up block inside a stage.
        size_multiple: what input sizes must be multiples of: R, or more when a block inside a stage
            pools below R and interpolates back (its coarser cells are active where any site is).
        patch_size: the mask patch: R unless ``wrap(..., patch_size=...)`` asked for a finer one.
        spatial_dims: 1 (signals, (B, C, L)), 2 (images) or 3 (volumes and video, (B, C, D, H, W)).
        geometry: the :class:`sparsify._geometry.Geometry` (rank and per-axis patch) of the masks.
        in_chans: input channels. input_size: the size used for tracing.
        norm_type: "batch", "layer", "group" or None, the network's dominant normalisation.
    """

    def __init__(self, sparse_gm: fx.GraphModule, dense_graph: fx.Graph, stages: list[Stage],
                 in_chans: int, input_size: tuple[int, ...], norm_type: str | None, model_name: str,
                 patch: tuple[int, ...] | None = None, multiple: tuple[int, ...] | None = None):
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
        rank = len(input_size)
        final = stages[-1].stride
        self._final = (final,) * rank if isinstance(final, int) else tuple(final)
        self._multiple = tuple(multiple) if multiple is not None else self._final
        self.geometry = Geometry(rank, tuple(patch) if patch is not None else self._final)

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
    def feature_strides(self) -> list[int | tuple[int, ...]]:
        return [s.stride for s in self.stages]

    @property
    def downsample_ratio(self) -> int | tuple[int, ...]:
        return self.stages[-1].stride

    @property
    def size_multiple(self) -> int | tuple[int, ...]:
        """What every input size must be a multiple of, per axis (an int when every axis agrees): the
        downsample ratio R, or a multiple of it when a block inside a stage pools below R and
        interpolates back (a DFC attention gate, an hourglass block)."""
        return compact(self.__dict__.get("_multiple", self._final))

    @property
    def patch_size(self) -> int | tuple[int, ...]:
        """The mask patch (an int when every axis agrees): one mask cell covers this many input sites."""
        return self.geometry.ratio

    @property
    def spatial_dims(self) -> int:
        return self.geometry.rank

    @property
    def code(self) -> str:
        """The generated Python source of the mask-aware forward (for inspection)."""
        return self._sparse_code

    @property
    def graph(self) -> fx.Graph:
        return self._sparse_graph

    def mask_grid(self, *size: int) -> tuple[int, ...]:
        """The patch grid (input size // patch size, per axis) for an input of this spatial size
        (``mask_grid(h, w)``, ``mask_grid(d, h, w)``, ``mask_grid(l)``); SparsifyError if it does not fit."""
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        rank = self.geometry.rank
        if len(size) != rank:
            raise SparsifyError(f"{self.model_name} is a {rank}-D encoder: its inputs have spatial size "
                                f"{_SIZE_FORMS.get(rank, '')}, got {len(size)} sizes {tuple(size)}")
        multiple = self.__dict__.get("_multiple", self._final)
        if multiple != self._final:  # a down-up block inside a stage pools below the total stride
            needed = Geometry(rank, multiple)
            if not needed.fits(size):
                lo, hi = needed.nearest(size)
                raise SparsifyError(
                    f"input size {Geometry.describe(size)} is not a multiple of the size multiple "
                    f"{compact(multiple)} of {self.model_name} (its downsample ratio is {compact(self._final)}, "
                    f"but a block inside pools to stride {compact(multiple)} and back); use sizes like "
                    f"{Geometry.describe(lo)} or {Geometry.describe(hi)}")
        if self._final != self.geometry.patch:  # the network itself needs multiples of its total stride
            final = Geometry(rank, self._final)
            if not final.fits(size):
                lo, hi = final.nearest(size)
                raise SparsifyError(
                    f"input size {Geometry.describe(size)} is not a multiple of the downsample ratio "
                    f"{compact(self._final)} of {self.model_name}; use sizes like {Geometry.describe(lo)} or "
                    f"{Geometry.describe(hi)}")
        if not self.geometry.fits(size):
            lo, hi = self.geometry.nearest(size)
            what = "downsample ratio" if self._final == self.geometry.patch else "patch size"
            raise SparsifyError(
                f"input size {Geometry.describe(size)} is not a multiple of the {what} {self.geometry.ratio} "
                f"of {self.model_name}; use sizes like {Geometry.describe(lo)} or {Geometry.describe(hi)}")
        return self.geometry.grid(size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Features finest to coarsest; ``mask`` is bool (B, 1, *grid), grid = spatial size // patch
        size per axis ((B, 1, H // R, W // R) for images), True = visible."""
        rank = self.geometry.rank
        if not isinstance(x, torch.Tensor) or x.dim() != rank + 2:
            kind = {1: "a signal batch (B, C, L)", 2: "an image batch (B, C, H, W)",
                    3: "a volume batch (B, C, D, H, W)"}.get(rank, f"a batch with {rank} spatial dims")
            raise SparsifyError(f"expected {kind}, got "
                                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_chans:
            raise SparsifyError(f"expected {self.in_chans} input channels, got {x.shape[1]}; wrap a model "
                                f"built for {x.shape[1]} channels (e.g. timm's in_chans=...)")
        grid = self.mask_grid(*x.shape[2:])
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
        patch = "" if self._final == self.geometry.patch else f", patch={self.patch_size}"
        if self.__dict__.get("_multiple", self._final) != self._final:
            patch += f", size_multiple={self.size_multiple}"
        return f"model={self.model_name}, R={self.downsample_ratio}{patch}, stages=[{pyramid}]"


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


def _example(model: nn.Module, in_chans: int, size: tuple[int, ...]) -> torch.Tensor:
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, in_chans, *size, generator=gen).to(device=device, dtype=dtype)


def _example_sizes(model: nn.Module, input_size: int | Sequence[int] | None, gm: fx.GraphModule | None = None
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The two example sizes: ``input_size`` per axis and twice it (224 x 224 for an image network
    when not given; volumes and signals have no usual size, so theirs must be given)."""
    if input_size is None:
        rank = _spatial_rank(model, 224, gm)
        if rank != 2:
            raise SparsifyError(f"{type(model).__name__} is a {rank}-D network: pass input_size as "
                                f"{_SIZE_FORMS.get(rank, 'one size per axis')}, e.g. {_SIZE_EXAMPLES.get(rank, '')}")
        input_size = (224, 224)
    size_a = _input_size(input_size, _spatial_rank(model, input_size, gm))
    return size_a, tuple(2 * s for s in size_a)


def _rounded_maps(shapes_a: dict, shapes_b: dict, size_a: tuple[int, ...], size_b: tuple[int, ...]) -> bool:
    """Whether some feature map's size is only roughly the input's over a stride (the input size does
    not divide the network's total stride): then the size, not the layers, is what to report."""
    from .stages import _rough_stride, axis_strides

    return any(axis_strides(shape, shapes_b.get(n), size_a, size_b) is None
               and _rough_stride(shape, shapes_b.get(n), size_b) is not None
               for n, shape in shapes_a.items())


def _size_multiple(gm: fx.GraphModule, shapes_a: dict, shapes_b: dict, size_a: tuple[int, ...],
                   size_b: tuple[int, ...], final: tuple[int, ...]) -> tuple[int, ...]:
    """Per axis, the least common multiple of the final stride and of every stride a map of ``gm``
    reaches: inputs must be multiples of it so that a down-up block inside a stage (a gate pooled
    below the final stride and interpolated back) sees whole cells."""
    import math

    from .stages import axis_strides

    multiple = list(final)
    for node in gm.graph.nodes:
        strides = axis_strides(shapes_a.get(node), shapes_b.get(node), size_a, size_b)
        if strides is not None:
            multiple = [math.lcm(m, s) for m, s in zip(multiple, strides)]
    return tuple(multiple)


def _checked_patch(patch_size: int | Sequence[int] | None, final: tuple[int, ...], stages: list[Stage],
                   name: str) -> tuple[int, ...]:
    """The mask patch per axis: the final stride, or a finer ``patch_size`` that divides it (and that
    every stage's stride divides or is a multiple of, so each map's cells cover whole patches)."""
    if patch_size is None:
        return final
    patch = per_axis(patch_size, len(final), "patch_size")
    if any(r % p for p, r in zip(patch, final)):
        raise SparsifyError(f"patch_size {compact(patch)} must divide {name}'s downsample ratio {compact(final)} "
                            f"on every axis (a patch finer than the coarsest stage, e.g. "
                            f"{compact(tuple(r // 2 if r % 2 == 0 else r for r in final))})")
    for stage in stages:
        stride = (stage.stride,) * len(final) if isinstance(stage.stride, int) else stage.stride
        if any(p % s and s % p for p, s in zip(patch, stride)):
            raise SparsifyError(f"stage '{stage.module or stage.name}' at stride {stage.stride} does not line up "
                                f"with patch_size {compact(patch)}: on every axis a stage's stride must divide "
                                "the patch or be a multiple of it")
    return patch


def wrap(model: nn.Module, input_size: int | Sequence[int] | None = None, stages: str | Sequence[str] = "auto",
         *, in_chans: int | None = None, leaf_modules: Iterable[type] = (),
         autowrap_functions: Iterable[Callable] = (), tracer_kwargs: dict[str, Any] | None = None,
         concrete_args: dict[str, Any] | None = None, patch_size: int | Sequence[int] | None = None
         ) -> SparseEncoder:
    """Turn an unmodified CNN (1-D, 2-D or 3-D) into a mask-aware sparse encoder.

    Args:
        model: any torch.fx-traceable network (timm, torchvision or your own). It is not modified;
            the encoder shares its modules and parameters.
        input_size: example spatial size used for tracing and stage discovery only: (H, W) for
            images (default 224 x 224), (D, H, W) for volumes and video, (L,) for signals; an int
            means that size on every axis of the model's rank (read from its convolutions). At run
            time any size that is a multiple of the downsample ratio on every axis works.
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
        patch_size: a mask patch finer than the downsample ratio (an int or one per axis dividing
            it), as nnssl's SparK3D masks 16^3 blocks on a stride-32 network. At maps coarser than
            the patch a cell is active when any of its patches is visible. Default: the ratio.

    Raises:
        SparsifyError: untraceable model, unsupported operations (all listed), bad sizes or stages.
    """
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"sparsify.wrap expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, (SparseEncoder, _DenseEncoder)) or isinstance(getattr(model, "encoder", None),
                                                                        SparseEncoder):
        raise SparsifyError(f"{type(model).__name__} is already made by sparsify.wrap; wrap the original model "
                            "(the encoder shares its weights), or use the encoder as it is")
    gm = _trace_checked(model, tuple(leaf_modules), tuple(autowrap_functions), tracer_kwargs, concrete_args)
    size_a, size_b = _example_sizes(model, input_size, gm)
    try:
        if in_chans:
            shapes_a = record_shapes(gm, _example(model, in_chans, size_a))
        else:
            in_chans, shapes_a = _infer_in_chans(model, gm, size_a)
    except SparsifyError as error:
        chans = in_chans or (_first_conv(model, gm) is not None and _first_conv_channels(model, gm))
        if not chans:
            raise
        # Too small for a down-up block inside (a gate pooled to 0 x 0): name the size that fits.
        named = list(stages) if isinstance(stages, (list, tuple)) else None
        check_total_stride(model, gm, chans, size_a, None, named, stride_only=True)
        failure = _attention_first(model, gm, explain_trace_failure(model, gm, _example(model, chans, size_a), error))
        if failure is error:
            raise
        raise failure from error
    check_trace_matches(model, gm, _example(model, in_chans, size_a))
    try:
        shapes_b = record_shapes(gm, _example(model, in_chans, size_b))
    except SparsifyError as error:
        second = (f"{type(model).__name__} does not run at a second input size {Geometry.describe(size_b)} "
                  "(sparsify runs two sizes to tell feature maps from fixed-size tensors).")
        attention = _attention_report(gm)
        if attention:  # fixed-size attention (relative position tables) is why: say that first
            raise SparsifyError(f"cannot wrap {type(model).__name__}.{attention}\nAlso: {second}"
                                f"\nDetails: {error}") from error
        raise SparsifyError(f"{second}\nDetails: {error}") from error
    names = None if stages == "auto" else list(stages)
    if isinstance(stages, str) and stages != "auto":
        raise SparsifyError(f"stages must be 'auto' or a list of node or module names, got {stages!r}")
    if _rounded_maps(shapes_a, shapes_b, size_a, size_b):
        # The size does not divide the network's total stride: say so first, before any message
        # about layers that only follows from the rounded sizes.
        check_total_stride(model, gm, in_chans, size_a, None, names, stride_only=True)
    try:
        chosen = discover_stages(gm, shapes_a, shapes_b, size_a, size_b, names)
    except SparsifyError as error:
        try:
            check_total_stride(model, gm, in_chans, size_a, error, names)
        except SparsifyError as stem_error:
            attention = _attention_report(gm) if getattr(stem_error, "unaligned_stem", False) else ""
            if attention:  # attention decides; the unaligned stem comes second
                raise SparsifyError(f"cannot wrap {type(model).__name__}.{attention}\nAlso: {stem_error}"
                                    ) from stem_error
            raise
        failure = _attention_first(model, gm, error)
        if failure is error:
            raise
        raise failure from error
    ratio = chosen[-1][1].stride
    final = (ratio,) * len(size_a) if isinstance(ratio, int) else tuple(ratio)
    if not Geometry(len(size_a), final).fits(size_a):
        check_total_stride(model, gm, in_chans, size_a, None, names)
        raise SparsifyError(f"input_size {size_a} is not a multiple of the network's downsample ratio "
                            f"{ratio}; pass input_size as a multiple of {ratio}")
    patch = _checked_patch(patch_size, final, [s for _, s in chosen], type(model).__name__)

    # Analyse and rewrite only what the stages need: the head is cut away first.
    cut = fx.GraphModule(gm, build_dense_graph(gm, [n for n, _ in chosen]), type(model).__name__)
    cut_nodes = {n.name: n for n in cut.graph.nodes}
    cut_outputs = [cut_nodes[s.name] for _, s in chosen]
    by_name = {n.name: n for n in gm.graph.nodes}
    cut_shapes_a = {n: shapes_a.get(by_name.get(n.name)) for n in cut.graph.nodes}
    cut_shapes_b = {n: shapes_b.get(by_name.get(n.name)) for n in cut.graph.nodes}
    multiple = _size_multiple(cut, cut_shapes_a, cut_shapes_b, size_a, size_b, final)
    if not Geometry(len(size_a), multiple).fits(size_a):  # a down-up block inside needs more than R
        check_total_stride(model, gm, in_chans, size_a, None, names)
        lo, hi = Geometry(len(size_a), multiple).nearest(size_a)
        raise SparsifyError(f"input_size {Geometry.describe(size_a)} is not a multiple of {type(model).__name__}'s "
                            f"size multiple {compact(multiple)}; use e.g. {Geometry.describe(lo)} or "
                            f"{Geometry.describe(hi)}")
    try:
        analysis = analyse(cut, cut_shapes_a, cut_shapes_b, size_a, size_b, patch, cut_outputs, multiple)
    except SparsifyError as error:
        stem = unaligned_stem(cut, cut_shapes_a, cut_shapes_b, size_a, size_b, cut_outputs)
        if stem and getattr(error, "attention", False):  # attention decides; the stem comes second
            raise SparsifyError(f"cannot wrap {type(model).__name__}. {error}\nAlso: {stem}") from error
        if stem:
            raise SparsifyError(f"{type(model).__name__}: {stem}\n{error}") from error
        raise
    sparse_graph = build_sparse_graph(cut, analysis, cut_outputs, cut_shapes_a, cut_shapes_b)
    sparse_gm = fx.GraphModule(cut, sparse_graph, "Sparse" + type(model).__name__)
    share_modules(sparse_gm, model)
    dense_graph = build_dense_graph(cut, cut_outputs)
    enc = SparseEncoder(sparse_gm, dense_graph, [s for _, s in chosen], in_chans, size_a,
                        _norm_type(sparse_gm), type(model).__name__, patch, multiple)
    enc._stage_modules = stage_modules(gm, [n for n, _ in chosen])
    enc._forward_kwargs = dict(gm.meta.get("concrete_args", {}))
    object.__setattr__(enc, "_source_model", model)
    return enc


def graph_node_names(model: nn.Module, input_size: int | Sequence[int] | None = None, *,
                     in_chans: int | None = None, leaf_modules: Iterable[type] = ()) -> list[GraphNode]:
    """Every node of the traced model: candidates for ``stages=[...]``.

    Each row is a :class:`sparsify.stages.GraphNode` ``(name, stride, shape, module, stage)``: the node
    name, its stride (None unless an (N, C, *spatial) map scaling with the input; an int when every
    axis agrees, else one per axis), its shape at
    ``input_size``, the module it belongs to, and ``stage``: its index in the pyramid that
    ``stages="auto"`` chooses (None for every other node).
    """
    gm = trace(model, tuple(leaf_modules))
    size_a, size_b = _example_sizes(model, input_size, gm)
    if in_chans:
        shapes_a = record_shapes(gm, _example(model, in_chans, size_a))
    else:
        in_chans, shapes_a = _infer_in_chans(model, gm, size_a)
    shapes_b = record_shapes(gm, _example(model, in_chans, size_b))
    return describe_nodes(gm, shapes_a, shapes_b, size_a, size_b)
