"""Per-block parameter table of a network (for `medexp params`)."""

from __future__ import annotations

from torch import nn


def kernel_kind(module: nn.Module) -> str:
    """'gabor 7', 'conventional 3', 'mixed' or '-' from the spatial convolutions inside `module`."""
    from medexp.nn.gabor import GaborConv2d, GaborConv3d

    kinds = set()
    for m in module.modules():
        if isinstance(m, (GaborConv2d, GaborConv3d)):
            kinds.add(f"gabor {m.kernel_size}")
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)) and max(m.kernel_size) > 1:
            kinds.add(f"conventional {m.kernel_size[0]}")
    if not kinds:
        return "-"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def block_table(model: nn.Module) -> list[tuple[str, str, int]]:
    """(block name, kernel kind, trainable parameters) for every top-level block; ModuleLists unrolled."""
    rows = []
    for name, child in model.named_children():
        items = child.named_children() if isinstance(child, nn.ModuleList) else [(None, child)]
        for index, block in items:
            n = count(block)
            if n:
                rows.append((name if index is None else f"{name}.{index}", kernel_kind(block), n))
    return rows
