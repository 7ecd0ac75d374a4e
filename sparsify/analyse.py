"""Step 2 of the pipeline: shapes, spatial layout and mask state of every tensor in the graph.

``record_shapes`` runs the traced graph on example inputs and keeps each node's output shape.
``analyse`` walks the graph in order, asks each operation's rule (``sparsify.adapters``) what it does
to layout and mask state, and decides the fewest mask multiplies that keep the contract: a feature
map is multiplied by the mask only where a consumer needs it to be zero at masked sites (a
convolution, a stage output) and it may not be.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from sparsify.adapters._flat import blame, flat_inputs, flat_rule, flatten_or
from sparsify.adapters._kinds import passthrough_nonspatial
from sparsify.adapters._registry import (
    NONSPATIAL,
    Decision,
    Info,
    NodeView,
    Unsupported,
    describe_target,
    find_rule,
)

from .errors import SparsifyError
from .trace import module_path

__all__ = ["record_shapes", "analyse", "Analysis", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode, restoring each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [v.shape for v in value]
    return None


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as error:
            raise SparsifyError(
                f"running the traced graph on the example input failed at node '{n.name}' "
                f"({describe_target(n)}): {type(error).__name__}: {error}. Check input_size and in_chans "
                "match what the model accepts." + self._fixed_map_hint(n)
            ) from error
        self.shapes[n] = _shape_of(result)
        return result

    def _fixed_map_hint(self, n: fx.Node) -> str:
        """Name a model tensor of fixed spatial size among the failing node's inputs, if any."""
        for arg in n.all_input_nodes:
            if arg.op != "get_attr":
                continue
            shape = self.shapes.get(arg)
            if isinstance(shape, torch.Size) and len(shape) >= 3 and shape[-1] > 1 and shape[-2] > 1:
                return (f" '{arg.target}' has a fixed shape {tuple(shape)}: a fixed map combined with feature "
                        "maps fits one input size only and is not computed from the visible sites, so it "
                        "cannot be made sparse (coordinate channels and positional biases are refused).")
        return ""


def record_shapes(gm: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, Any]:
    """Output shape of every node for ``example`` (eval mode, no grad, the model left as it was).

    Runs under a fake-tensor mode (shapes only, no arithmetic), falling back to a real run for
    operations fake tensors cannot handle.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    recorder = _ShapeRecorder(gm)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a failed fake run is retried for real below
    try:
        with torch.no_grad(), eval_mode(gm), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            recorder.run(mode.from_tensor(example))
        return recorder.shapes
    except SparsifyError:
        recorder = _ShapeRecorder(gm)
    finally:
        fake_log.setLevel(level)
    with torch.no_grad(), eval_mode(gm):
        recorder.run(example)
    return recorder.shapes


@dataclass
class Analysis:
    """The result of :func:`analyse`."""

    infos: dict[fx.Node, Any]
    decisions: dict[fx.Node, Decision]
    to_mask: set[fx.Node]
    input_node: fx.Node
    problems: list[str] = field(default_factory=list)


def _is_aligned(shape_a, shape_b, spatial, size_a, size_b, patch: tuple[int, ...],
                final: tuple[int, ...]) -> bool:
    """A map is patch-aligned when each spatial size is input / s (or input * k) at both sizes, with
    s dividing the patch size, so the patch mask maps onto it by nearest-neighbour repetition; or,
    when the patch is finer than the final stride, s a multiple of the patch dividing the final stride
    (a cell covers whole patches; its mask is their maximum)."""
    for dim, p, r, big_a, big_b in zip(spatial, patch, final, size_a, size_b):
        ha, hb = shape_a[dim], shape_b[dim]
        if ha * big_b != hb * big_a:
            return False
        if big_a % ha == 0:
            s = big_a // ha
            if p % s != 0 and not (s % p == 0 and r % s == 0):
                return False
        elif ha % big_a != 0:
            return False
    return True


def analyse(gm: fx.GraphModule, shapes_a: dict, shapes_b: dict, size_a: tuple[int, ...],
            size_b: tuple[int, ...], ratio: int | tuple[int, ...], outputs: list[fx.Node],
            final: int | tuple[int, ...] | None = None) -> Analysis:
    """Classify every node of ``gm`` and choose where to multiply by the mask.

    ``size_a`` / ``size_b`` are the two example spatial sizes (one entry per axis), ``ratio`` the mask
    patch (an int or one per axis) and ``final`` the final stride (default: the patch).

    Raises SparsifyError listing every unsupported node (with module path, op and the fix).
    """
    modules = dict(gm.named_modules())
    input_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    rank = len(size_a)
    patch = (ratio,) * rank if isinstance(ratio, int) else tuple(ratio)
    final = patch if final is None else (final,) * rank if isinstance(final, int) else tuple(final)

    def walk(masked: set[fx.Node]):
        infos, decisions, problems = _walk(gm, modules, shapes_a, shapes_b, size_a, size_b, (patch, final),
                                           input_node, masked)
        if problems:
            error = SparsifyError(_problem_report(problems, modules))
            error.attention = bool(_attention_nodes(problems))  # the deciding reason (encoder.wrap orders by it)
            raise error
        needed = {n for d in decisions.values() for n in d.require_zero if not infos[n].zero}
        needed |= {n for n in outputs if not infos[n].zero}
        return infos, decisions, needed

    # Grow the set of masked nodes to a fixpoint, then drop each one that later ones made redundant
    # (e.g. relu(y) needs no multiply once y itself is masked for another consumer).
    to_mask: set[fx.Node] = set()
    for _ in range(1000):
        infos, decisions, needed = walk(to_mask)
        if needed <= to_mask:
            break
        to_mask |= needed
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(to_mask, key=order.get, reverse=True):
        trial = to_mask - {node}
        trial_infos, trial_decisions, trial_needed = walk(trial)
        if trial_needed <= trial:
            to_mask, infos, decisions = trial, trial_infos, trial_decisions
    to_mask, infos, decisions = _mask_before_activations(walk, to_mask, infos, decisions, shapes_a)
    bad = []
    for node in to_mask:
        if not infos[node].aligned:
            bad.append(f"  - node '{node.name}' ({describe_target(node)}): needs masking but its grid is "
                       "shifted by padding or not a whole fraction of the patch grid")
    for node, decision in decisions.items():
        if decision.mask_of is not None and not infos[decision.mask_of].aligned:
            bad.append(f"  - node '{node.name}' ({describe_target(node)}): computes statistics of a map "
                       "whose grid does not line up with the patch grid")
    if bad:
        raise SparsifyError("sparsify cannot derive the mask for these feature maps:\n" + "\n".join(bad)
                            + "\nUse padding that keeps sizes a whole fraction of the input, or register an "
                            "adapter for the enclosing module (sparsify.register_adapter).")
    return Analysis(infos=infos, decisions=decisions, to_mask=to_mask, input_node=input_node)


def _mask_before_activations(walk, to_mask: set[fx.Node], infos: dict, decisions: dict, shapes_a: dict):
    """Move each multiply by the mask from an op's output to its only input, where that still works.

    act(y * m) equals act(y) * m for an op that keeps 0 at 0, but ``act`` keeps a map for backward
    (ReLU and LeakyReLU their output, in place or not): masked after it, the next convolution keeps a
    second, masked copy; masked before it, both keep the same tensor. Each move is checked by a
    walk of the graph (the node must come out zero by itself); the values are the same either way.
    """
    def spatial_inputs(node):
        return [n for n in node.all_input_nodes if isinstance(infos.get(n), Info) and infos[n].spatial is not None]

    todo = sorted(to_mask, key=lambda n: n.name)
    while todo:
        node = todo.pop()
        if node not in to_mask:
            continue
        inputs = spatial_inputs(node)
        if len(inputs) != 1:
            continue
        source = inputs[0]
        if (source in to_mask or source.op == "placeholder" or len(source.users) != 1
                or not infos[source].aligned or infos[source].zero):
            continue
        if shapes_a.get(source) != shapes_a.get(node) or infos[source].spatial != infos[node].spatial:
            continue  # only across elementwise ops (activations, dropout): where a second copy is saved
        trial = (to_mask - {node}) | {source}
        trial_infos, trial_decisions, trial_needed = walk(trial)
        if trial_needed <= trial:
            to_mask, infos, decisions = trial, trial_infos, trial_decisions
            todo.append(source)  # and perhaps further up, through another activation
    return to_mask, infos, decisions


def _walk(gm, modules, shapes_a, shapes_b, size_a, size_b, grid, input_node, to_mask):
    infos: dict[fx.Node, Any] = {}
    decisions: dict[fx.Node, Decision] = {}
    problems: list[tuple[fx.Node, str]] = []
    poisoned: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            infos[node] = Info(spatial=tuple(range(2, 2 + len(size_a))), zero=True) if node is input_node else None
            continue
        if node.op == "output":
            continue
        shape = shapes_a.get(node)
        if node.op == "get_attr":
            infos[node] = NONSPATIAL if shape is not None else None
            continue
        inputs = node.all_input_nodes
        if any(n in poisoned for n in inputs):
            poisoned.add(node)
            infos[node] = NONSPATIAL if shape is not None else None
            continue
        if shape is None:  # sizes, dtypes, Python values: nothing to mask
            infos[node] = None
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        view = NodeView(node, module, infos, shapes_a)
        rule = find_rule(node, module)
        try:
            if flat_inputs(view):  # positions flattened into one axis: only pooling over them
                decision = flat_rule(view, rule)
            elif rule is None:
                if view.spatial_inputs():
                    raise Unsupported("no adapter is registered for this operation")
                decision = passthrough_nonspatial(view)
            else:
                decision = flatten_or(view, rule)
        except Unsupported as reason:
            problem = blame(view, str(reason))
            if problem not in problems:
                problems.append(problem)
            poisoned.add(node)
            infos[node] = NONSPATIAL
            continue
        out = decision.out
        if isinstance(out, Info) and out.zero and _upsamples_coarse(node, shape, out.spatial, infos, shapes_a,
                                                                    size_a, grid[0]):
            out = out.but(zero=False)
        if isinstance(out, Info) and out.spatial is not None and isinstance(shape, torch.Size):
            aligned = out.aligned and _is_aligned(shape, shapes_b[node], out.spatial, size_a, size_b, *grid)
            zero = out.zero or node in to_mask
            out = out.but(aligned=aligned, zero=zero)
        infos[node] = out
        decisions[node] = decision
    return infos, decisions, problems


def _upsamples_coarse(node, shape, spatial, infos, shapes_a, size_a, patch) -> bool:
    """Whether ``node`` upsamples a map coarser than the mask patch (a down-up block's gate).

    Such a map is zero only at its coarse cells that are wholly masked (a cell is active where any
    of its patches is visible), so its upsampled copy is not zero at every masked site of the finer
    grid: the analysis must mask it where a consumer needs zeros.
    """
    if spatial is None or not isinstance(shape, torch.Size):
        return False
    for arg in node.all_input_nodes:
        info, arg_shape = infos.get(arg), shapes_a.get(arg)
        if not isinstance(info, Info) or info.spatial is None or not isinstance(arg_shape, torch.Size):
            continue
        if len(info.spatial) != len(spatial):
            continue
        for size, p, d_in, d_out in zip(size_a, patch, info.spatial, spatial):
            cells = arg_shape[d_in]
            if 0 < cells < shape[d_out] and size > p * cells:  # coarser than the patch, made finer
                return True
    return False


def _attention_nodes(problems: list[tuple[fx.Node, str]]) -> str:
    """Matrix products downstream of the refused nodes (attention written by hand), named, or ''."""
    import operator

    products = {torch.matmul, torch.bmm, torch.einsum, torch.baddbmm, operator.matmul, "matmul", "bmm",
                torch.nn.functional.scaled_dot_product_attention}
    seen: set[fx.Node] = set()
    todo = [node for node, _ in problems]
    hits = []
    while todo:
        node = todo.pop()
        for user in node.users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
                if user.target in products:
                    hits.append(f"'{user.name}'")
    return ", ".join(sorted(hits)[:6])


def _problem_report(problems: list[tuple[fx.Node, str]], modules: dict[str, nn.Module]) -> str:
    attention = _attention_nodes(problems)
    lines = []
    if attention:  # the deciding reason goes first: no adapter can make attention sparse
        lines.append(f"The model uses attention over positions ({attention}): attention mixes every position "
                     "with every other, so masked patches cannot be treated as absent. sparsify supports "
                     "convolutional networks; for a hybrid pass stages=[...] ending before the first attention "
                     "block.")
    described = []
    for node, reason in problems:
        owner = module_path(node)
        path = f" in module '{owner}'" if owner and node.op != "call_module" else ""
        kind = f" ({type(modules[node.target]).__name__})" if node.op == "call_module" else ""
        described.append(f"node '{node.name}': {describe_target(node)}{kind}{path}: {reason}")
    # the first line names the first refused node and why (one-line summaries keep the reason)
    lines.append(f"sparsify cannot make {len(problems)} operation(s) mask-aware, first {described[0]}. "
                 "Each operation that touches spatial dims in a way no adapter covers:")
    lines += [f"  - {d}" for d in described]
    lines.append(
        "Attention over positions, unfold, spatial slicing and unknown leaf modules cannot be simulated "
        "as sparse convolution. If the operation is in fact mask-safe, or you can write a masked version, "
        "register it: sparsify.register_adapter(MyModule, masked_forward, kind='statistic'|'mixing'|"
        "'pointwise') (see README, 'Writing an adapter'); if it is after the last stage you need, pass "
        "stages=[...] to stop before it."
    )
    return "\n".join(lines)
