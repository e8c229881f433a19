"""Every choice in conf/{kernel,loss,head,model} builds from the tree and trains (docs/design.md §10)."""

import itertools
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_medexp, store_uri
from mlflow.tracking import MlflowClient

from medexp.config import build
from medexp.config.compose import compose_config
from medexp.config.registry import group_choices
from medexp.nn.fast import IMPLS

KERNELS, HEADS, MODELS = group_choices("kernel"), group_choices("head"), group_choices("model")
SMALL_UNET = "model.channels=[4,8,16]"
SMALL_WONG = "+model.channels=[4,4,8,8,8]"  # same blocks as the paper's network, fewer channels: fast


def test_config_tree_has_the_designed_choices():
    assert KERNELS == ["conventional", "gabor", "mixed"]
    assert HEADS == ["nerdc", "nerdm", "plain"]
    assert {"wong2022", "unet"} <= set(MODELS)
    assert {"pcc", "dice", "ce", "dice_ce", "focal", "tversky", "wce", "bwce", "explog"} <= set(
        group_choices("loss")
    )


@pytest.mark.parametrize(
    ("kernel", "head", "model", "input_layer"),
    list(itertools.product(KERNELS, HEADS, MODELS, group_choices("input_layer"))),
)
def test_every_kernel_head_model_combination_runs_forward_and_backward(kernel, head, model, input_layer):
    overrides = [f"kernel={kernel}", f"head={head}", f"model={model}", f"input_layer={input_layer}"]
    overrides.append(SMALL_UNET if model == "unet" else SMALL_WONG)
    cfg = compose_config(overrides)
    for dims, size in ((3, 16), (2, 16)):
        net = build.build_model(cfg, in_channels=2, num_classes=3, spatial_dims=dims)
        x = torch.randn(1, 2, *[size] * dims)
        out = net(x)
        assert out.shape == (1, 3, *[size] * dims)
        out.square().mean().backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), (
            "gradient reaches every parameter"
        )


def _children(cwd: Path, experiment: str):
    client = MlflowClient(store_uri(cwd))
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.e2e
def test_every_kernel_and_head_trains_one_epoch_on_demo_data(workdir: Path):
    args = ["train", "-m", f"kernel={','.join(KERNELS)}", f"head={','.join(HEADS)}", *TINY, SMALL_WONG]
    result = run_medexp(
        [*args, "trainer.max_epochs=1", "eval.metrics=[dice]", "experiment_name=zoo"], cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _children(workdir, "zoo")
    assert {(r.data.tags["kernel"], r.data.tags["head"]) for r in runs} == set(
        itertools.product(KERNELS, HEADS)
    )
    assert all(r.info.status == "FINISHED" and r.data.tags["diverged"] == "false" for r in runs)
    assert all(0.0 <= r.data.metrics["test/dice_mean"] <= 1.0 for r in runs)
    # what kernel.impl=auto ran is on record for Gabor layers: 15 of the 21 spatial convs in the mixed model
    impls = {r.data.tags["kernel"]: r.data.tags.get("conv_impls") for r in runs}
    assert impls["conventional"] is None
    for kernel, convs in (("gabor", 21), ("mixed", 15)):
        counts = dict(item.split(":") for item in impls[kernel].split(","))
        assert set(counts) <= set(IMPLS) - {"auto"} and sum(map(int, counts.values())) == convs, impls


@pytest.mark.e2e
def test_every_loss_trains_one_epoch_on_demo_data(workdir: Path):
    losses = group_choices("loss")
    args = [
        "train",
        "-m",
        f"loss={','.join(losses)}",
        *TINY,
        SMALL_WONG,
        "trainer.max_epochs=1",
        "eval.metrics=[dice]",
    ]
    result = run_medexp([*args, "experiment_name=losses"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _children(workdir, "losses")
    assert sorted(r.data.tags["loss"] for r in runs) == sorted(losses)
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["diverged"] == "false", r.data.tags["loss"]
        assert torch.isfinite(torch.tensor(r.data.metrics["train/loss"])), r.data.tags["loss"]


@pytest.mark.e2e
def test_2d_unet_trains_on_demo2d(workdir: Path):
    args = [
        "train",
        "model=unet",
        "dataset=demo2d",
        "dataset.num_cases=8",
        "dataset.shape=[32,32]",
        SMALL_UNET,
    ]
    result = run_medexp(
        [*args, "trainer.max_epochs=1", "trainer.progress=false", "experiment_name=2d"], cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = MlflowClient(store_uri(workdir)).search_runs(
        [MlflowClient(store_uri(workdir)).get_experiment_by_name("2d").experiment_id]
    )
    assert run.data.params["dataset.spatial_dims"] == "2" and run.info.status == "FINISHED"
