"""`medexp params [overrides]`: the composed model's parameter table, block by block."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from torch import nn

from medexp.config.build import build_dataset, build_model, kernel_kind
from medexp.config.compose import compose_config
from medexp.config.validate import validate
from medexp.nn.gabor import GaborConv2d, GaborConv3d


def block_kernel(module: nn.Module) -> str:
    """'gabor 7', 'conventional 3', 'mixed' or '-' from the spatial convolutions inside `module`."""
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
                rows.append((name if index is None else f"{name}.{index}", block_kernel(block), n))
    return rows


def print_params(overrides: list[str], num_classes: int, in_channels: int, from_dataset: bool) -> None:
    """Compose the model of `overrides` and print its block table; the last line is `parameters: N`."""
    cfg = compose_config(list(overrides))
    validate(cfg)
    dims = cfg.dataset.get("spatial_dims", 3)
    if from_dataset:
        info = build_dataset(cfg).info
        num_classes, in_channels, dims = info.num_classes, info.in_channels, info.spatial_dims
    model = build_model(cfg, in_channels, num_classes, dims)
    table = Table(title=f"{cfg.model._target_.rsplit('.', 1)[-1]}: kernel={kernel_kind(cfg)}, {dims}D")
    for column in ("block", "kernel", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for name, kind, n in block_table(model):
        table.add_row(name, kind, f"{n:,}")
    Console().print(table)
    print(f"parameters: {count(model)}")
