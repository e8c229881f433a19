"""The data pipeline a GPU needs: worker defaults, loader settings, augmentation on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medexp.config.compose import compose_config
from medexp.config.validate import validate
from medexp.data.augment import random_affine
from medexp.data.loaders import MAX_AUTO_WORKERS, DeviceAugment, auto_num_workers, make_loader
from medexp.errors import ConfigError
from medexp.run.data import loader_settings
from medexp.run.dist import DistContext
from medexp.run.steps import numerics, train_epoch


@pytest.mark.parametrize(
    "cpus,devices,accelerator,expected",
    [
        (2, 1, "cpu", 0),  # training on the CPU: no workers, whatever the core count
        (64, 1, "cpu", 0),
        (2, 1, "cuda", 1),  # 2 cores, one GPU: one worker, one core for the training loop
        (1, 1, "cuda", 0),
        (16, 2, "cuda", 7),  # 8 cores per GPU, one for the loop
        (16, 1, "cuda", MAX_AUTO_WORKERS),  # 15 free cores, capped
        (16, 8, "cuda", 1),
        (12, 8, "cuda", 0),  # 1 core per GPU: augmentation stays in the training process
    ],
)
def test_auto_num_workers_by_hand(cpus, devices, accelerator, expected):
    assert auto_num_workers(cpus, devices, accelerator) == expected


def test_loader_settings_from_the_trainer_config():
    cfg = compose_config([])
    assert cfg.trainer.num_workers == "auto"
    cpu = DistContext()
    assert loader_settings(cfg, cpu) == dict(
        num_workers=0, pin_memory=False, persistent_workers=True, prefetch_factor=2
    )  # pin_memory only means something for CUDA
    cfg = compose_config(["trainer.num_workers=3", "trainer.prefetch_factor=4"])
    assert loader_settings(cfg, cpu)["num_workers"] == 3
    assert loader_settings(cfg, cpu)["prefetch_factor"] == 4


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.num_workers=-1", "trainer.num_workers=-1: expected auto or an integer >= 0"),
        ("trainer.num_workers=many", "trainer.num_workers=many: expected auto or an integer >= 0"),
        ("trainer.prefetch_factor=0", "trainer.prefetch_factor=0: expected an integer >= 1"),
    ],
)
def test_bad_loader_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config([override]))
    assert str(err.value) == message


def test_make_loader_passes_the_worker_settings(tmp_path):
    cases = []
    for i in range(2):
        np.save(tmp_path / f"c{i}_image.npy", np.zeros((1, 8, 8, 8), np.float32))
        np.save(tmp_path / f"c{i}_label.npy", np.zeros((1, 8, 8, 8), np.uint8))
        cases.append(
            {
                "id": f"c{i}",
                "image": str(tmp_path / f"c{i}_image.npy"),
                "label": str(tmp_path / f"c{i}_label.npy"),
            }
        )
    loader = make_loader(cases, batch_size=1, train=True, num_workers=2, pin_memory=True, prefetch_factor=3)
    assert (loader.num_workers, loader.pin_memory, loader.prefetch_factor) == (2, True, 3)
    assert loader.persistent_workers
    loader = make_loader(cases, batch_size=1, train=True, num_workers=0, prefetch_factor=3)
    assert loader.prefetch_factor is None and not loader.persistent_workers  # torch's rules without workers


def _blocks(batch: int = 2, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, s, s, s) label maps of four blocks (values 0..3, by halves of the first two axes) and images
    equal to them."""
    half = torch.arange(size) // (size // 2)  # 0 or 1 along an axis
    label = (half[:, None, None] + 2 * half[None, :, None]).to(torch.uint8)  # (s, s, 1)
    label = label.expand(batch, 1, size, size, size).contiguous()
    return label.float(), label


def test_device_augment_transforms_each_image_and_its_label_alike():
    image, label = _blocks()
    augment = DeviceAugment(random_affine(3, [16] * 3, prob=1.0, device="cpu"), seed=0)
    out_image, out_label = augment(image, label)
    assert out_image.shape == image.shape and out_label.shape == label.shape
    assert out_image.dtype == image.dtype and out_label.dtype == label.dtype
    assert set(out_label.unique().tolist()) <= {0, 1, 2, 3}  # nearest-neighbour labels
    assert not torch.equal(out_label, label)  # p = 1: every image moved
    assert not torch.equal(out_label[0], out_label[1])  # each image of the batch has its own affine
    # the image (bilinear) and the label (nearest) went through the same affine: they agree away from the
    # block borders, where bilinear interpolation blends neighbouring values
    assert (out_image.round() == out_label.float()).float().mean() > 0.9
    again = DeviceAugment(random_affine(3, [16] * 3, prob=1.0, device="cpu"), seed=0)(image, label)
    assert torch.equal(again[1], out_label)  # seeded: reproducible


def test_device_augment_is_the_loaders_augmentation():
    """With the same random state, the device path (grid built on the given device, here the CPU) computes
    what the loader's transform computes on a CPU item."""
    image, label = _blocks(batch=1)
    on_device = DeviceAugment(random_affine(3, [16] * 3, prob=1.0, device="cpu"), seed=3)(image, label)
    in_loader = Compose(random_affine(3, [16] * 3, prob=1.0))
    in_loader.set_random_state(seed=3)
    item = in_loader({"image": MetaTensor(image[0]), "label": MetaTensor(label[0])})
    torch.testing.assert_close(on_device[0][0], item["image"].as_tensor(), rtol=1e-5, atol=1e-5)
    assert torch.equal(on_device[1][0], item["label"].as_tensor().to(torch.uint8))


def test_train_epoch_runs_the_device_augmentation_before_the_network():
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            seen.append(x)
            return self.scale * torch.zeros(x.shape[0], 2, *x.shape[2:])

    image, label = _blocks(batch=1, size=8)
    steps = numerics("32", channels_last=True, spatial_dims=3, device=torch.device("cpu"))
    net = Recorder()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    class Bar:
        def step(self, loss):
            pass

    loss_fn = lambda logits, target: logits.float().mean()  # noqa: E731
    train_epoch(
        net,
        [{"image": image, "label": label}],
        loss_fn,
        optimizer,
        steps,
        DistContext(),
        Bar(),
        augment=lambda i, lab: (i + 10, lab),
    )
    torch.testing.assert_close(seen[0], image + 10)  # the network saw the augmented batch
    assert seen[0].is_contiguous(memory_format=torch.channels_last_3d)  # in the trainer's layout


def test_job_data_moves_the_augmentation_to_the_device(tmp_path):
    """trainer.augment_on_device=true: the training loader augments nothing, the job's DeviceAugment runs
    the augment group's transforms built for the training device."""
    from monai.transforms import RandAffined

    from medexp.run.data import job_data

    overrides = ["dataset.shape=[16,16,16]", "dataset.num_cases=4", f"dataset.root={tmp_path}"]
    cfg = compose_config([*overrides, "trainer.augment_on_device=true"])
    data = job_data(cfg, DistContext())
    assert isinstance(data.device_augment, DeviceAugment)
    (affine,) = data.device_augment.transform.transforms
    assert isinstance(affine, RandAffined) and affine.rand_affine.resampler.device == torch.device("cpu")
    transforms = data.train_loader.dataset.transform.transforms
    assert not any(isinstance(t, RandAffined) for t in transforms)
    on_loader = job_data(compose_config(overrides), DistContext())
    assert on_loader.device_augment is None
    assert any(isinstance(t, RandAffined) for t in on_loader.train_loader.dataset.transform.transforms)
