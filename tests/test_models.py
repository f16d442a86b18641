"""Tests for lightning_idrs.models."""
import pytest
import torch
from torch import nn

from lightning_idrs.models import (
    CifarResNet,
    Normalize,
    available_models,
    build_model,
    register_model,
)

DIGITS = ((1, 8, 8), (0.3053,), (0.3760,))
MNIST = ((1, 28, 28), (0.1307,), (0.3081,))
CIFAR = ((3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


@pytest.mark.parametrize(
    "arch, spec",
    [
        ("mlp", DIGITS),
        ("small_cnn", DIGITS),
        ("small_cnn", MNIST),
        ("lenet", MNIST),
        ("resnet20", CIFAR),
        ("resnet32", CIFAR),
        ("resnet56", CIFAR),
        ("resnet110", CIFAR),
    ],
)
def test_arch_gives_logits(arch, spec):
    torch.manual_seed(0)
    shape, mean, std = spec
    model = build_model(arch, shape, 10, mean, std).eval()
    with torch.no_grad():
        out = model(torch.rand(3, *shape))
    assert out.shape == (3, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert isinstance(model[0], Normalize)


def test_all_registered_names():
    assert {"mlp", "small_cnn", "lenet", "resnet20", "resnet110"} <= set(available_models())


@pytest.mark.parametrize("depth, n_blocks", [(20, 3), (110, 18)])
def test_resnet_depth(depth, n_blocks):
    net = build_model(f"resnet{depth}", *CIFAR[:1], 10, *CIFAR[1:]).net
    assert isinstance(net, CifarResNet) and net.depth == depth
    assert [len(s) for s in (net.layer1, net.layer2, net.layer3)] == [n_blocks] * 3
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == depth  # 6n+2 weighted layers (1x1 shortcuts not counted)
    assert net.layer3[0].conv1.out_channels == 64
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet((3, 32, 32), 10, depth=21)


def test_normalize_is_first_layer_and_correct():
    shape, mean, std = CIFAR
    model = build_model("resnet20", shape, 10, mean, std)
    first = next(iter(model.children()))
    assert first is model.normalize and isinstance(first, Normalize)
    x = torch.rand(2, *shape)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(first(x), expected)
    # buffers, not parameters: saved in the state dict, never trained
    state = model.state_dict()
    torch.testing.assert_close(state["normalize.mean"].flatten(), torch.tensor(mean))
    torch.testing.assert_close(state["normalize.std"].flatten(), torch.tensor(std))
    assert all(not name.startswith("normalize") for name, _ in model.named_parameters())


def test_state_dict_round_trip_restores_normalization():
    shape, mean, std = DIGITS
    torch.manual_seed(0)
    a = build_model("small_cnn", shape, 10, mean, std).eval()
    b = build_model("small_cnn", shape, 10, (0.0,), (1.0,)).eval()
    x = torch.rand(4, *shape)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x))


def test_normalize_validation():
    with pytest.raises(ValueError, match="^mean and std must be non-empty per-channel sequences of equal length"):
        Normalize((0.5, 0.5), (0.2,))
    with pytest.raises(ValueError, match=r"^std must be positive, got \(0\.0,\)$"):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match=r"^mean/std need one value per input channel \(3\), got 1 and 1$"):
        build_model("mlp", (3, 8, 8), 10, (0.5,), (0.2,))


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("vgg16", (1, 8, 8), 10, (0.5,), (0.2,))
    msg = str(err.value)
    assert "vgg16" in msg
    for name in ("mlp", "small_cnn", "lenet", "resnet20", "resnet110"):
        assert name in msg


def test_lenet_rejects_tiny_inputs():
    with pytest.raises(ValueError, match="12x12"):
        build_model("lenet", (1, 8, 8), 10, (0.5,), (0.2,))


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda input_shape, num_classes: nn.Identity())


def test_num_classes_respected():
    model = build_model("mlp", (1, 8, 8), 3, (0.5,), (0.2,))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("arch, lr", [("small_cnn", 0.02), ("mlp", 0.05)])
def test_sgd_reduces_loss_on_digits(arch, lr):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images[:256]).float().div(16).unsqueeze(1)
    y = torch.from_numpy(digits.target[:256]).long()
    shape, mean, std = DIGITS
    torch.manual_seed(0)
    model = build_model(arch, shape, 10, mean, std)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        initial = loss_fn(model(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    assert final < 0.5 * initial, (initial, final)
