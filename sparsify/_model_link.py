"""What ties an encoder to the user's model: shared Module objects, and which module returns each stage.

fx copies a traced-through module as a bare container holding only the tensors the graph uses;
:func:`share_modules` puts the model's own module back wherever the graph uses all of its tensors,
so moving or converting either one moves both. :func:`stage_modules` finds, per stage, the module of
the model whose output it is, so the model's own outputs (forward hooks) can be the ground truth.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .trace import module_outputs

__all__ = ["share_modules", "stage_modules"]


def stage_modules(gm: fx.GraphModule, stage_nodes: list[fx.Node]) -> list[str | None]:
    """Per stage, the outermost module called once whose forward returned that node (hookable ground
    truth for "mask=None equals the model"), or None."""
    calls = gm.meta.get("module_calls", {})
    out: list[str | None] = []
    for node in stage_nodes:
        paths = [p for p, _ in module_outputs(node) if calls.get(p) == 1]
        out.append(paths[-1] if paths else None)
    return out


def share_modules(gm: fx.GraphModule, model: nn.Module) -> None:
    """Put the model's own Module objects where fx made partial copies (containers for traced-through
    modules), when the graph uses every parameter and buffer of that module: then ``enc.to()`` and
    ``model.to()`` act on the same buffer registries."""

    def tensors(m: nn.Module) -> set[int]:
        return {id(t) for t in m.parameters()} | {id(t) for t in m.buffers()}

    def visit(owner: nn.Module, prefix: str) -> None:
        for name, child in list(owner._modules.items()):
            path = f"{prefix}{name}"
            try:
                real = model.get_submodule(path)
            except AttributeError:
                continue
            if child is real:
                continue
            if tensors(real) <= tensors(child):
                owner._modules[name] = real
            else:
                visit(child, path + ".")

    visit(gm, "")
