"""Input sizes and grids that do not fit the network: errors that state why and what fits.

Shapes at a size that does not divide the network's total stride are rounded, so the stride read
from them is wrong (resnet18 at 100 px looks like stride 29). :func:`check_total_stride` measures the
network at a probe size divisible by every usual stride, under fake tensors (shapes only), and states
the true stride with the nearest sizes that fit. :func:`unaligned_stem` names the first layer whose
grid never lines up with the input's (an unpadded first convolution), after which nothing can be
masked.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from ._geometry import Geometry, compact
from .analyse import eval_mode
from .errors import SparsifyError
from .stages import axis_strides, discover_stages, node_stride
from .trace import module_path

__all__ = ["check_total_stride", "unaligned_stem"]


#: Probe size for the true total stride: divisible by every stride up to 64 made of 2s, 3s, 5s and 7s
#: that CNNs use (shapes only, under fake tensors, so the size costs nothing).
_PROBE = 2**6 * 3**2 * 5 * 7


def _fake_shapes(gm: fx.GraphModule, model: nn.Module, in_chans: int, size: tuple[int, ...]) -> dict | None:
    """Shapes at ``size`` under fake tensors only (never a real run: the probe size is huge)."""
    import logging

    from torch._subclasses.fake_tensor import FakeTensorMode

    from .analyse import _ShapeRecorder

    recorder = _ShapeRecorder(gm)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad(), eval_mode(gm), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            ref = next(model.parameters(), None)
            dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
            example = torch.empty(1, in_chans, *size, dtype=dtype, device=ref.device if ref is not None else "cpu")
            recorder.run(mode.from_tensor(example))
        return recorder.shapes
    except Exception:
        return None
    finally:
        fake_log.setLevel(level)


def check_total_stride(model: nn.Module, gm: fx.GraphModule, in_chans: int, size: tuple[int, ...],
                        error: SparsifyError | None, names: list[str] | None = None, *,
                        stride_only: bool = False) -> None:
    """Raise a SparsifyError stating the network's true total stride when ``size`` does not fit it, or
    naming the first layer whose grid never lines up with the input's (an unpadded convolution).

    Shapes at ``size`` itself cannot tell the stride when it does not divide (sizes get rounded), so
    the network is measured at a probe size divisible by every usual stride, and the patch size is
    the stride of the last stage found there (the user's ``names``, or the automatic choice), else of
    the deepest map the output depends on. Returns quietly when the probe finds nothing to add (the
    caller then raises its own error). ``stride_only``: check the size against the stride and nothing
    else (the check that runs first, before any other message).
    """
    rank = len(size)
    probe_a, probe_b = (_PROBE,) * rank, (2 * _PROBE,) * rank
    shapes_a = _fake_shapes(gm, model, in_chans, probe_a)
    shapes_b = _fake_shapes(gm, model, in_chans, probe_b) if shapes_a is not None else None
    if shapes_a is None or shapes_b is None:
        return
    nodes = list(gm.graph.nodes)
    try:
        stages = discover_stages(gm, shapes_a, shapes_b, probe_a, probe_b, names)
    except SparsifyError:
        stages = None
    output = stages[-1][0] if stages else nodes[-1]
    needed: set[fx.Node] = {output} if stages else set()
    todo = [output]
    while todo:
        n = todo.pop()
        for arg in n.all_input_nodes:
            if arg not in needed:
                needed.add(arg)
                todo.append(arg)
    strides = {n: axis_strides(shapes_a.get(n), shapes_b.get(n), probe_a, probe_b) for n in nodes if n in needed}
    found = [s for n, s in strides.items() if s is not None and n.op != "placeholder"]
    name = type(model).__name__
    if found:
        # Inputs must be multiples of every stride a map reaches on the way to the last stage: the
        # last stage's stride, and more where a down-up block inside a stage pools below it.
        multiple = tuple(math.lcm(*(s[i] for s in found)) for i in range(rank))
        ratio = axis_strides(shapes_a.get(output), shapes_b.get(output), probe_a, probe_b) if stages else None
        geometry = Geometry(rank, multiple)
        if not geometry.fits(size):
            lo, hi = geometry.nearest(size)
            if ratio is not None and tuple(ratio) != multiple:
                raise SparsifyError(
                    f"input_size {Geometry.describe(size)} is not a multiple of {name}'s size multiple "
                    f"{compact(multiple)}: its downsample ratio (the stride of its last stage, which is also the "
                    f"mask patch size) is {compact(ratio)}, but a block inside a stage pools to stride "
                    f"{compact(multiple)} and back; use e.g. {Geometry.describe(lo)} or {Geometry.describe(hi)}")
            raise SparsifyError(
                f"input_size {Geometry.describe(size)} is not a multiple of {name}'s downsample ratio "
                f"{compact(multiple)} (the stride of its last stage, which is also the mask patch size); use e.g. "
                f"{Geometry.describe(lo)} or {Geometry.describe(hi)}")
        return
    if stride_only:
        return
    for n in nodes:
        shape = shapes_a.get(n)
        if n.op == "placeholder" or not isinstance(shape, torch.Size) or len(shape) != rank + 2:
            continue
        on_grid = node_stride(shape, shapes_b.get(n), probe_a, probe_b) is not None
        if not on_grid and _relaid(shape, shapes_b.get(n), probe_a, probe_b):
            continue  # an on-grid map with its dims reordered (channels-last): look at the next map
        if not on_grid:
            where = module_path(n) or "<top level>"
            raise _stem_error(
                f"{name}'s feature maps never line up with the patch grid: node '{n.name}' in module '{where}' "
                f"turns a {Geometry.describe(probe_a)} input (a probe size that every whole stride divides) into "
                f"{Geometry.describe(shape[2:])}, which is not the input divided by a whole stride (e.g. a "
                "convolution without padding), and no later feature map is. "
                "Masked patches cannot be mapped onto such maps; pad the first layers (padding=kernel_size//2)."
                + (f"\nDetails: {error}" if error is not None else ""))
        break


def unaligned_stem(gm: fx.GraphModule, shapes_a: dict, shapes_b: dict, size_a: tuple[int, ...],
                    size_b: tuple[int, ...], outputs: list[fx.Node]) -> str:
    """Name the first feature map, on every path to the stages, whose size is not the input's divided
    by a whole stride (an unpadded first convolution): everything after it is off the patch grid."""
    nodes = list(gm.graph.nodes)
    input_node = nodes[0]
    for node in nodes[1:]:
        shape = shapes_a.get(node)
        if not isinstance(shape, torch.Size) or len(shape) != len(size_a) + 2:
            continue
        if node_stride(shape, shapes_b.get(node), size_a, size_b) is not None or _is_pad(gm, node):
            continue  # a pad grows the map on purpose; the layer after it decides whether the grid holds
        if _relaid(shape, shapes_b.get(node), size_a, size_b):
            continue  # an on-grid map with its dims reordered (channels-last for a LayerNorm), not shifted
        seen, todo = {node, input_node}, [input_node]
        while todo:  # can the stages be reached from the input without passing through this node?
            for user in todo.pop().users:
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
        if any(out in seen for out in outputs):
            return ""
        return (f"its first layers never line up with the patch grid: node '{node.name}' in module "
                f"'{module_path(node) or '<top level>'}' turns a {Geometry.describe(size_a)} input into "
                f"{Geometry.describe(shape[2:])}, not the input divided by a whole stride (e.g. a convolution without "
                "padding), and every feature map after it is shifted against the patches. Pad the first layers "
                "(padding=kernel_size//2) so masked patches map onto the feature maps.")
    return ""


def _stem_error(text: str) -> SparsifyError:
    error = SparsifyError(text)
    error.unaligned_stem = True  # wrap puts attention, when present, before this reason
    return error


def _relaid(shape_a: torch.Size, shape_b, size_a: tuple[int, ...], size_b: tuple[int, ...]) -> bool:
    """Whether every input axis has a dim of this map that is the input divided by a whole stride at
    both sizes, in some position: a permuted on-grid map ((N, H, W, C) before a channels-last norm),
    not one shifted by a missing pad."""
    if not isinstance(shape_b, torch.Size) or len(shape_b) != len(shape_a):
        return False
    free = list(range(1, len(shape_a)))
    for a, b in zip(size_a, size_b):
        hit = next((d for d in free if shape_a[d] * b == shape_b[d] * a and a % shape_a[d] == 0
                    and shape_a[d] != shape_b[d]), None)
        if hit is None:
            return False
        free.remove(hit)
    return True


def _is_pad(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.nn.functional.pad, torch.constant_pad_nd)
    if node.op == "call_method":
        return node.target == "pad"
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.modules.padding._ConstantPadNd
                          | nn.modules.padding._ReflectionPadNd | nn.modules.padding._ReplicationPadNd
                          | nn.modules.padding._CircularPadNd)
    return False
