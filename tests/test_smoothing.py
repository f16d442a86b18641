"""Monte Carlo CERTIFY / PREDICT of the smoothed classifier."""
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_idrs import ConstantSigma, Sigma, SmoothedClassifier, add_noise, certified_radius
from lightning_idrs.smoothing import ABSTAIN, clopper_pearson_lower
from tests.helpers import ViewCNN

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Linear2(nn.Module):
    """f(x) = 1 if w.x > b else 0, as two logits; pA under N(x, s^2 I) is Phi(|w.x - b| / (s |w|))."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", w.flatten())
        self.b = b

    def forward(self, x):
        score = x.flatten(1) @ self.w - self.b
        return torch.stack([-score, score], dim=1)


class PerInputSigma(Sigma):
    """sigma(x) = first pixel of x (a test double with the sigma-function interface)."""

    semi_elasticity = 0.0

    def forward(self, x):
        return x.flatten(1)[:, 0].abs() + 0.05


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x):
        self.batches.append(x.clone())
        return torch.zeros(x.shape[0], 3, device=x.device)


def _linear_problem(device, margin=0.3, sigma=0.5, dim=6):
    w = torch.zeros(dim, device=device)
    w[0] = 2.0
    x = torch.zeros(1, dim, device=device)
    x[0, 0] = margin  # w.x - b = 2 * margin, |w| = 2: distance to the boundary is margin
    true_p_a = stats.norm.cdf(margin / sigma)
    return Linear2(w, 0.0).to(device), x, true_p_a


@pytest.mark.parametrize("device", DEVICES)
def test_p_a_lower_is_a_valid_lower_bound_in_repeated_runs(device):
    model, x, true_p_a = _linear_problem(device, margin=0.6)  # pA = 0.885
    smoothed = SmoothedClassifier(model, ConstantSigma(0.5), num_classes=2)
    runs, alpha = 400, 0.05
    generator = torch.Generator(device=device).manual_seed(0)
    cert = smoothed.certify(x.repeat(runs, 1), n0=20, n=200, alpha=alpha, batch_size=1000, generator=generator)
    assert np.all(cert.prediction == 1)
    violations = int((cert.p_a_lower > true_p_a).sum())
    # at most alpha of runs may overshoot; allow for binomial fluctuation at the 1e-6 level
    assert violations <= stats.binom.ppf(1 - 1e-6, runs, alpha)
    # and the bound is informative, not trivially small
    assert true_p_a - 0.1 < cert.p_a_lower.mean() < true_p_a
    np.testing.assert_allclose(cert.radius, certified_radius(cert.p_a_lower, cert.sigma))


def test_radius_uses_the_sigma_functions_semi_elasticity_and_dimension():
    model, x, _ = _linear_problem("cpu", margin=1.0)

    class ElasticSigma(ConstantSigma):
        @property
        def semi_elasticity(self):
            return 0.2

    smoothed = SmoothedClassifier(model, ElasticSigma(0.5), num_classes=2)
    cert = smoothed.certify(x.repeat(5, 1), 10, 500, 0.001, 256, torch.Generator().manual_seed(1))
    expected = certified_radius(cert.p_a_lower, cert.sigma, 0.2, dim=x.shape[1])
    np.testing.assert_allclose(cert.radius, expected)
    assert np.all(cert.radius < certified_radius(cert.p_a_lower, cert.sigma))


def test_noise_is_per_input_and_batches_mix_inputs():
    recorder = Recorder()
    x = torch.zeros(3, 1, 20, 20)
    x[:, 0, 0, 0] = torch.tensor([0.0, 0.45, 0.95])  # sigmas 0.05, 0.5, 1.0
    smoothed = SmoothedClassifier(recorder, PerInputSigma(), num_classes=3)
    smoothed.predict(x, n=50, alpha=0.001, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert [b.shape[0] for b in recorder.batches] == [64, 64, 22]  # full batches across inputs
    samples = torch.cat(recorder.batches).reshape(3, 50, -1)
    noise = samples - x.reshape(3, 1, -1)
    noise[:, :, 0] = 0  # the pixel carrying sigma
    std = noise.std(dim=(1, 2))
    np.testing.assert_allclose(std.numpy(), [0.05, 0.5, 1.0], rtol=0.05)


def test_seeded_generator_reproduces_results():
    model, x, _ = _linear_problem("cpu", margin=0.1)
    smoothed = SmoothedClassifier(model, ConstantSigma(0.5), num_classes=2)
    first = smoothed.certify(x.repeat(4, 1), 10, 300, 0.01, 100, torch.Generator().manual_seed(7))
    second = smoothed.certify(x.repeat(4, 1), 10, 300, 0.01, 100, torch.Generator().manual_seed(7))
    other = smoothed.certify(x.repeat(4, 1), 10, 300, 0.01, 100, torch.Generator().manual_seed(8))
    np.testing.assert_array_equal(first.p_a_lower, second.p_a_lower)
    assert not np.array_equal(first.p_a_lower, other.p_a_lower)


def test_abstains_below_one_half_and_predict_abstains_on_the_boundary():
    model, x, _ = _linear_problem("cpu", margin=0.0)  # pA = 1/2 exactly
    smoothed = SmoothedClassifier(model, ConstantSigma(0.5), num_classes=2)
    generator = torch.Generator().manual_seed(3)
    cert = smoothed.certify(x.repeat(20, 1), 10, 400, 0.001, 1000, generator)
    assert np.all(cert.prediction == ABSTAIN) and np.all(cert.radius == 0)
    assert np.all(smoothed.predict(x.repeat(20, 1), 400, 0.001, 1000, generator) == ABSTAIN)
    _, far, _ = _linear_problem("cpu", margin=2.0)  # same classifier, input far from the boundary
    assert np.all(smoothed.predict(far.repeat(5, 1), 200, 0.001, 1000, generator) == 1)


def test_clopper_pearson_matches_the_beta_quantile():
    k = np.array([0, 1, 50, 99, 100])
    expected = [0.0] + [stats.beta.ppf(0.05, j, 100 - j + 1) for j in k[1:]]
    np.testing.assert_allclose(clopper_pearson_lower(k, 100, 0.05), expected)
    assert clopper_pearson_lower(100, 100, 0.05) == pytest.approx(0.05 ** (1 / 100))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n0=0), r"^n0 must be an integer >= 1, got 0$"),
        (dict(n=0), r"^n must be an integer >= 1, got 0$"),
        (dict(n=2.5), r"^n must be an integer >= 1, got 2\.5$"),
        (dict(n=True), r"^n must be an integer >= 1, got True$"),
        (dict(alpha=0.0), r"^alpha must be a number in \(0, 1\), got 0\.0$"),
        (dict(alpha=1.0), r"^alpha must be a number in \(0, 1\), got 1\.0$"),
        (dict(alpha="0.01"), r"^alpha must be a number in \(0, 1\), got the string '0\.01'$"),
        (dict(alpha=None), r"^alpha must be a number in \(0, 1\), got None$"),
        (dict(batch_size=0), r"^batch_size must be an integer >= 1, got 0$"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    model, x, _ = _linear_problem("cpu")
    smoothed = SmoothedClassifier(model, ConstantSigma(0.5), num_classes=2)
    arguments = dict(n0=10, n=100, alpha=0.01, batch_size=64) | kwargs
    with pytest.raises(ValueError, match=message):
        smoothed.certify(x, **arguments)


def test_integral_floats_and_numpy_scalars_are_integers_everywhere():
    model, x, _ = _linear_problem("cpu", margin=1.0)
    smoothed = SmoothedClassifier(model, ConstantSigma(0.5), num_classes=2)
    as_ints = smoothed.certify(x, 10, 100, 0.01, 64, torch.Generator().manual_seed(0))
    as_floats = smoothed.certify(x, 10.0, np.int64(100), np.float64(0.01), 64.0, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(as_ints.p_a_lower, as_floats.p_a_lower)


def test_add_noise_is_one_level_per_input_and_seeded():
    x = torch.zeros(3, 2, 50, 50)
    sigma = torch.tensor([0.1, 1.0, 3.0])
    noisy = add_noise(x, sigma, torch.Generator().manual_seed(5))
    np.testing.assert_allclose(noisy.flatten(1).std(1).numpy(), sigma.numpy(), rtol=0.05)
    torch.testing.assert_close(noisy, add_noise(x, sigma, torch.Generator().manual_seed(5)), rtol=0, atol=0)


def test_bad_inputs():
    model, x, _ = _linear_problem("cpu")
    smoothed = SmoothedClassifier(model, ConstantSigma(0.5), num_classes=2)
    with pytest.raises(ValueError, match="^x contains NaN or inf$"):
        smoothed.certify(torch.full_like(x, float("nan")), 10, 100, 0.01, 64)
    with pytest.raises(ValueError, match=r"^x must have shape \[B, \.\.\.\] with B >= 1, got \(6,\)$"):
        smoothed.certify(x[0], 10, 100, 0.01, 64)
    with pytest.raises(ValueError, match=r"^alpha must be a number in \(0, 1\), got 2\.0$"):
        smoothed.predict(x, 100, 2.0, 64)


def test_channels_last_weights_change_the_layout_not_the_certificates():
    from lightning_idrs.models import build_model
    from lightning_idrs.smoothing import use_channels_last

    torch.manual_seed(0)
    model = build_model("small_cnn", (1, 8, 8), 10, (0.5,), (0.25,)).eval()
    reference = build_model("small_cnn", (1, 8, 8), 10, (0.5,), (0.25,))
    reference.load_state_dict(model.state_dict())
    reference.eval()
    assert use_channels_last(model, (1, 8, 8), "cpu") is True and not model.training
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not any(m.weight.is_contiguous() for m in convs if m.in_channels > 1)  # C = 1: both layouts
    x = torch.rand(6, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    runs = [SmoothedClassifier(m, ConstantSigma(0.3), 10).certify(x, 20, 400, 0.001, 128,
                                                                  torch.Generator().manual_seed(3))
            for m in (model, reference)]
    np.testing.assert_array_equal(runs[0].prediction, runs[1].prediction)  # same noise; logits differ by ~1e-6
    np.testing.assert_allclose(runs[0].p_a_lower, runs[1].p_a_lower, atol=0.01)

    mlp = build_model("mlp", (1, 8, 8), 10, (0.5,), (0.25,))  # no 4-D weights: left as it is
    before = {k: v.stride() for k, v in mlp.state_dict().items()}
    assert use_channels_last(mlp, (1, 8, 8), "cpu") is False
    assert {k: v.stride() for k, v in mlp.state_dict().items()} == before


def test_a_model_that_cannot_run_channels_last_is_refused_and_restored():
    from lightning_idrs.smoothing import use_channels_last

    model = ViewCNN().train()
    with pytest.raises(ValueError, match="cannot run with channels-last weights: view size"):
        use_channels_last(model, (1, 8, 8), "cpu")
    assert model.conv.weight.is_contiguous() and model.training
    with torch.inference_mode():
        assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
