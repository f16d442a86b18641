"""Model architectures and a name-based builder.

Every model built by :func:`build_model` is ``nn.Sequential(normalize=Normalize(mean, std), net=...)``:
it takes images in pixel space [0, 1] (where the smoothing noise is added, as in Cohen et al. 2019)
and its first layer normalises them. ``Normalize`` keeps mean / std as buffers, so they are saved in
the checkpoint's state dict.

Architectures (``arch`` names):

* ``mlp``: 2 hidden layers of 256 units (digits);
* ``small_cnn``: 3 conv layers + 1 hidden FC layer (digits; works for any input size);
* ``lenet``: LeNet-5 layout (conv5-pool-conv5-pool-fc-fc) widened to 32/64 channels (MNIST);
* ``resnet20`` / ``resnet32`` / ``resnet56`` / ``resnet110``: CIFAR ResNets of He et al. (2016),
  depth 6n+2, basic blocks, stages of 16/32/64 channels; ResNet-110 is Cohen et al.'s CIFAR-10
  model. Like Cohen et al.'s code, a stride/width change uses a 1x1 conv + BN projection shortcut.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Normalize",
    "MLP",
    "SmallCNN",
    "LeNet",
    "CifarResNet",
    "MODELS",
    "register_model",
    "available_models",
    "build_model",
]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers (saved with the model)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape or len(mean_t) == 0:
            raise ValueError(f"mean and std must be non-empty per-channel sequences of equal length, got {mean}, {std}")
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class MLP(nn.Sequential):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256)) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = 1
        for d in input_shape:
            width *= int(d)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Sequential):
    """conv32-conv32-pool-conv64-pool -> adaptive avg-pool to 2x2 -> fc128 -> logits.

    About 62k parameters (1x8x8 input); fast on CPU for 8x8 digits and valid for any input of at least 1x1.
    Hidden layers use He (Kaiming) init: with PyTorch's default init this 5-layer ReLU stack sits on
    the loss plateau for tens of SGD steps.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        c = int(input_shape[0])
        super().__init__(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )
        weighted = [m for m in self if isinstance(m, (nn.Conv2d, nn.Linear))]
        for m in weighted[:-1]:  # the output layer keeps the default (small) init
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


class LeNet(nn.Module):
    """LeNet-5 layout with ReLU and max-pooling, 32/64 channels: conv5(pad 2)-pool-conv5-pool-fc256-logits.

    For 1x28x28 inputs the feature map before the classifier is 64x5x5. Inputs need H, W >= 12.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c, h, w = (int(d) for d in input_shape)
        if h < 12 or w < 12:
            raise ValueError(f"lenet needs inputs of at least 12x12 pixels, got input_shape {tuple(input_shape)}")
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        h2, w2 = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Linear(64 * h2 * w2, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU-3x3 conv-BN plus shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2: conv16 -> 3 stages of n basic blocks (16, 32, 64 ch) -> avg-pool -> fc."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 20) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(int(input_shape[0]), 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------------- registry
ModelFactory = Callable[[Sequence[int], int], nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory(input_shape, num_classes) -> nn.Module`` (without Normalize) as ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    return sorted(MODELS)


register_model("mlp")(MLP)
register_model("small_cnn")(SmallCNN)
register_model("lenet")(LeNet)
for _depth in (20, 32, 56, 110):
    register_model(f"resnet{_depth}")(
        lambda input_shape, num_classes, _d=_depth: CifarResNet(input_shape, num_classes, depth=_d)
    )
del _depth


def build_model(
    arch: str,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Sequential:
    """Build ``arch`` as ``nn.Sequential(normalize=Normalize(mean, std), net=<arch>)``.

    The model maps pixel-space inputs ``[B, *input_shape]`` in [0, 1] to logits ``[B, num_classes]``.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; valid names: {', '.join(available_models())}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if len(mean) != input_shape[0] or len(std) != input_shape[0]:
        raise ValueError(
            f"mean/std need one value per input channel ({input_shape[0]}), got {len(mean)} and {len(std)}"
        )
    net = MODELS[arch](tuple(int(d) for d in input_shape), int(num_classes))
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))
