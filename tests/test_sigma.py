"""Tests for sigma(x) = sigma_b exp(r (d_k(x) - m)) from an exact faiss kNN index (docs/math.md)."""
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_idrs import ConstantSigma, KnnSigma
from lightning_idrs.embeddings import OrthonormalProjection


def brute_force_knn_mean(queries, train, k, exclude=None):
    """Mean distance to the k nearest rows of train, all pairwise distances in float64 NumPy."""
    q = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    x = np.asarray(train, dtype=np.float64).reshape(len(train), -1)
    out = np.empty(len(q))
    for i in range(0, len(q), 32):  # norm of the difference, 32 queries at a time
        dist = np.sqrt(((q[i:i + 32, None, :] - x[None, :, :]) ** 2).sum(-1))
        if exclude is not None:
            dist[np.arange(len(dist)), exclude[i:i + 32]] = np.inf
        out[i:i + 32] = np.partition(dist, k - 1, axis=1)[:, :k].mean(1)
    return out


def brute_force_sigma(queries, train, k, sigma_b, r, exclude=None):
    train_means = brute_force_knn_mean(train, train, k, exclude=np.arange(len(train)))
    m = train_means.mean()
    return sigma_b * np.exp(r * (brute_force_knn_mean(queries, train, k, exclude) - m)), m


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    return torch.from_numpy(images[:1500]), torch.from_numpy(images[1500:])


def test_matches_brute_force_random():
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.normal(size=(400, 3, 5, 4)).astype(np.float32))
    queries = torch.from_numpy(rng.normal(size=(60, 3, 5, 4)).astype(np.float32))
    sigma = KnnSigma(0.5, 0.3, k=7, batch_size=16).fit(train)
    expected, m = brute_force_sigma(queries.numpy(), train.numpy(), 7, 0.5, 0.3)
    assert sigma.m == pytest.approx(m, rel=1e-6)
    out = sigma(queries)
    assert out.dtype == torch.float32 and out.shape == (60,)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    train_expected, _ = brute_force_sigma(train.numpy(), train.numpy(), 7, 0.5, 0.3, exclude=np.arange(400))
    idx = torch.tensor([0, 5, 399, 5])
    np.testing.assert_allclose(sigma.training_sigma(train[idx], idx).numpy(), train_expected[idx], rtol=1e-5)


def test_matches_brute_force_digits(digits):
    train, test = digits
    sigma = KnnSigma(0.25, 0.5, k=10).fit(train)
    everything = torch.arange(len(train))
    train_means = brute_force_knn_mean(train.numpy(), train.numpy(), 10, exclude=everything.numpy())
    m = train_means.mean()
    assert sigma.m == pytest.approx(m, rel=1e-6)
    expected = 0.25 * np.exp(0.5 * (brute_force_knn_mean(test.numpy(), train.numpy(), 10) - m))
    np.testing.assert_allclose(sigma(test).numpy(), expected, rtol=1e-5)
    train_expected = 0.25 * np.exp(0.5 * (train_means - m))
    np.testing.assert_allclose(sigma.training_sigma(train, everything).numpy(), train_expected, rtol=1e-5)
    # a training point as a query is its own nearest neighbour (distance 0); in training_sigma it is not
    assert sigma(train[:1]).item() < sigma.training_sigma(train[:1], everything[:1]).item()


@pytest.mark.parametrize("copies", [2, 40])  # 40 > k + margin: needs the float64 fallback scan
def test_self_exclusion_by_index_with_duplicates(copies):
    rng = np.random.default_rng(1)
    base = rng.uniform(size=(50, 6)).astype(np.float32)
    train = np.concatenate([base, np.repeat(base[:3], copies - 1, axis=0)])  # points 0..2 duplicated
    sigma = KnnSigma(1.0, 1.0, k=4, candidate_margin=4).fit(torch.from_numpy(train))
    idx = np.arange(len(train))
    expected = brute_force_knn_mean(train, train, 4, exclude=idx)
    training = sigma.training_sigma(None, torch.from_numpy(idx)).double().numpy()  # sigma_b = r = 1
    np.testing.assert_allclose(training, np.exp(expected - sigma.m), rtol=1e-6)
    if copies == 40:  # the duplicates of a duplicated point are its neighbours at distance 0
        assert expected[0] == 0.0
        assert sigma.training_sigma(None, torch.tensor([0])).item() == pytest.approx(math.exp(-sigma.m))
    np.testing.assert_allclose(sigma.neighbour_distance(torch.from_numpy(base[:5])).numpy(),
                               brute_force_knn_mean(base[:5], train, 4), rtol=1e-5, atol=1e-7)


def _pairs(rng, train, count, smallest=1e-7):
    """Random pairs, far apart and close together (down to ``smallest``), at and between training points."""
    n, d = train.shape
    anchors = train[rng.integers(n, size=2 * count)].astype(np.float64)
    anchors[:count] += rng.normal(size=(count, d))
    anchors = anchors + rng.normal(scale=1e-3, size=anchors.shape) * (rng.uniform(size=(2 * count, 1)) < 0.5)
    steps = rng.normal(size=anchors.shape)
    lengths = 10.0 ** rng.uniform(np.log10(smallest), 0.5, size=(2 * count, 1))
    steps *= lengths / np.linalg.norm(steps, axis=1, keepdims=True)
    return anchors.astype(np.float32), (anchors + steps).astype(np.float32)


# d=512: faiss' own float32 distances break the bound for close pairs (~100 of 800 pairs with r=3);
# clusters at +-300: the rounding bound cannot vouch for faiss' ranking, rows take the float64 scan.
@pytest.mark.parametrize("dim, spread, smallest", [(16, 0.0, 1e-7), (512, 0.0, 1e-7), (64, 300.0, 1e-4)])
def test_empirical_semi_elasticity(dim, spread, smallest):
    rng = np.random.default_rng(2)
    centres = spread * np.sign(rng.normal(size=(300, 1))) * np.ones(dim)
    train = (rng.normal(size=(300, dim)) + centres).astype(np.float32)
    r = 3.0
    sigma = KnnSigma(0.5, r, k=5).fit(torch.from_numpy(train))
    x, y = _pairs(rng, train, 400, smallest)  # at 300, steps below float32 resolution would vanish
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    gap = (torch.log(sigma(x).double()) - torch.log(sigma(y).double())).abs()
    dist = torch.linalg.vector_norm(x.double() - y.double(), dim=1)
    sx, sy = sigma(x), sigma(y)
    slack = sigma.log_error(sx, 40 * sx.double()) + sigma.log_error(sy, 40 * sy.double())  # the radius allows this
    assert (gap <= r * dist + slack).all(), (gap - r * dist - slack).max()
    assert ((dist > 0) & (dist < 100 * smallest)).sum() > 50  # the close pairs are really there
    np.testing.assert_allclose(sigma.neighbour_distance(x[:200]).numpy(),
                               brute_force_knn_mean(x[:200].numpy(), train, 5), rtol=1e-5)


def test_orthonormal_projection_keeps_r(digits):
    train, test = digits
    proj = OrthonormalProjection.from_pca(train, 12)
    p = proj.components
    torch.testing.assert_close(p @ p.T, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)
    sigma = KnnSigma(0.25, 0.5, k=10, embedding=proj).fit(train)
    assert sigma.semi_elasticity == 0.5
    flat_train, flat_test = train.reshape(len(train), -1).double(), test.reshape(len(test), -1).double()
    expected = brute_force_knn_mean((flat_test @ p.T).numpy(), (flat_train @ p.T).numpy(), 10)
    np.testing.assert_allclose(sigma.neighbour_distance(test).numpy(), expected, rtol=1e-5)
    x, y = test[:100], test[100:200]
    gap = (sigma(x).double().log() - sigma(y).double().log()).abs()
    assert (gap <= 0.5 * torch.linalg.vector_norm((x - y).reshape(100, -1).double(), dim=1) + 1e-6).all()
    with pytest.raises(ValueError, match="components rows are not orthonormal: max"):
        OrthonormalProjection(2 * torch.eye(3))


class ScaledProjection(nn.Module):
    """phi(x) = scale * Q x with orthonormal rows Q: Lip(phi) = scale exactly."""

    def __init__(self, scale, features=8, dim=4):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(features, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        self.register_buffer("q", q)
        self.lipschitz_constant = scale

    def forward(self, x):
        return self.lipschitz_constant * x.reshape(len(x), -1).double() @ self.q


def test_semi_elasticity_means_r_in_input_space_with_any_embedding():
    torch.manual_seed(0)
    train, x, y = torch.rand(100, 8), torch.rand(300, 8), torch.rand(300, 8)
    sigma = KnnSigma(0.5, 0.4, 3, embedding=ScaledProjection(2.5)).fit(train)
    assert sigma.semi_elasticity == 0.4 and "r=0.4" in sigma.label  # the argument, the property, the label
    assert sigma.rate == pytest.approx(0.16, rel=1e-15)
    gap = (sigma(x).double().log() - sigma(y).double().log()).abs()
    step = torch.linalg.vector_norm((x - y).double(), dim=1)
    assert (gap <= 0.4 * step + 1e-6).all()
    away = sigma.embedding.q[:, 0].float()  # moving away from the data along phi's range: d_k grows at Lip(phi)
    far, farther = 50 * away[None], 50.5 * away[None]
    tight = (sigma(farther).double().log() - sigma(far).double().log()).item()
    assert 0.39 * 0.5 < tight <= 0.4 * 0.5  # sigma is r-semi-elastic in input space, and not less
    expected = 0.5 * torch.exp(sigma.rate * (sigma.neighbour_distance(x) - sigma.m))
    torch.testing.assert_close(sigma(x), expected.float())
    declared = KnnSigma(0.5, 0.4, 3, embedding=nn.Sequential(nn.Linear(8, 4), nn.ReLU()), embedding_lipschitz=3.0)
    assert declared.semi_elasticity == 0.4 and declared.rate * 3.0 <= 0.4


@pytest.mark.parametrize("seed", range(5))
def test_rate_is_the_largest_float_that_keeps_r(seed):
    from fractions import Fraction
    rng = np.random.default_rng(seed)
    for r, lip in zip(rng.uniform(0, 2, 200), np.exp(rng.uniform(-5, 5, 200))):
        rate = KnnSigma(0.5, float(r), 3, embedding_lipschitz=float(lip)).rate
        assert Fraction(rate) * Fraction(float(lip)) <= Fraction(float(r))
        assert Fraction(math.nextafter(rate, math.inf)) * Fraction(float(lip)) > Fraction(float(r))


def test_undeclared_lipschitz_or_approximate_index_is_refused():
    learned = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    with pytest.raises(ValueError, match="declares no Lipschitz constant, so sigma.x. cannot be made r-semi-elastic"):
        KnnSigma(0.5, 0.4, 3, embedding=learned).fit(torch.rand(100, 8))
    assert KnnSigma(0.5, 0.0, 3, embedding=learned).fit(torch.rand(100, 8)).semi_elasticity == 0.0  # constant
    with pytest.raises(ValueError, match="is an approximate kNN index"):
        KnnSigma(0.5, 0.4, 3, index_factory="IVF4,Flat").fit(torch.rand(200, 8)).semi_elasticity


def test_a_checkpoint_that_recorded_the_rate_as_r_keeps_its_sigma():
    """Version-1 extra state (lightning_idrs 0.2): r was the exponent's rate, the certificate used r * Lip."""
    train, x = torch.rand(100, 8), torch.rand(50, 8)
    trained = KnnSigma(0.5, 0.4, 3, embedding=ScaledProjection(2.5)).fit(train)
    state = trained.state_dict()
    extra = dict(state["_extra_state"])
    for name in ("semi_elasticity", "recorded_rate"):
        extra.pop(name)
    state["_extra_state"] = extra | {"version": 1, "r": 0.4}
    old = KnnSigma(0.5, 0.4, 3, embedding=ScaledProjection(2.5))
    old.load_state_dict(state)
    old.fit(train)
    assert old.rate == 0.4 and old.semi_elasticity >= 1.0 and old.semi_elasticity == pytest.approx(1.0, rel=1e-15)
    torch.testing.assert_close(old(x), (0.5 * torch.exp(0.4 * (old.neighbour_distance(x) - old.m))).float())
    again = KnnSigma(0.5, 0.4, 3, embedding=ScaledProjection(2.5))
    again.load_state_dict(old.state_dict())  # saved again (version 2): still the recorded rate
    assert again.rate == 0.4 and again.semi_elasticity == old.semi_elasticity
    plain = dict(trained.state_dict()["_extra_state"])
    flat = KnnSigma(0.5, 0.3, 3)
    flat.load_state_dict({"_extra_state": plain | {"version": 1, "r": 0.3, "embedding_lipschitz": None}}, strict=False)
    assert flat.rate == flat.semi_elasticity == 0.3  # Lip(phi) = 1: the rate and r are one number


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), r"^k must be an integer >= 1, got 0$"),
    (dict(k=2.5), r"^k must be an integer >= 1, got 2\.5$"),
    (dict(k="3"), r"^k must be an integer >= 1, got the string '3'$"),
    (dict(sigma_base=0.0), r"^sigma_base must be a finite number > 0, got 0\.0$"),
    (dict(sigma_base=-1.0), r"^sigma_base must be a finite number > 0, got -1\.0$"),
    (dict(sigma_base=None), r"^sigma_base must be a finite number > 0, got None$"),
    (dict(semi_elasticity=-0.1), r"^semi_elasticity must be a finite number >= 0, got -0\.1$"),
    (dict(semi_elasticity=float("nan")), r"^semi_elasticity must be a finite number >= 0, got nan$"),
    (dict(m=float("inf")), r"^m must be a finite number, got inf$"),
    (dict(embedding_lipschitz=0.0), r"^embedding_lipschitz must be a finite number > 0, got 0\.0$"),
    (dict(candidate_margin=-1), r"^candidate_margin must be an integer >= 0, got -1$"),
    (dict(embedding=3), r"^embedding must be callable or None, got int$"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(sigma_base=0.5, semi_elasticity=0.1, k=3) | kwargs
    with pytest.raises(ValueError, match=match):
        KnnSigma(**args)


def test_bad_data():
    train = torch.rand(10, 4)
    with pytest.raises(ValueError, match="k must be smaller than the number of training points"):
        KnnSigma(0.5, 0.1, k=11).fit(train)
    with pytest.raises(ValueError, match="k must be smaller than the number of training points .*got k=10 with 10 training points"):
        KnnSigma(0.5, 0.1, k=10).fit(train)
    for bad in (float("nan"), float("inf")):
        corrupt = train.clone()
        corrupt[3, 1] = bad
        with pytest.raises(ValueError, match="train contains NaN or inf"):
            KnnSigma(0.5, 0.1, k=3).fit(corrupt)
    sigma = KnnSigma(0.5, 0.1, k=3).fit(train)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        sigma(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        sigma(torch.tensor([[0.0, float("-inf"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="x has 5 features per point after the embedding, but the index holds 4-dimensional points"):
        sigma(torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"^sigma_base must be a finite number > 0, got 0\.0$"):
        ConstantSigma(0.0)
    with pytest.raises(RuntimeError, match="KnnSigma is not fitted: call fit"):
        KnnSigma(0.5, 0.1, k=3)(train)


def test_batching_shapes_and_empty():
    rng = np.random.default_rng(3)
    train = torch.from_numpy(rng.uniform(size=(300, 2, 3, 3)).astype(np.float32))
    x = torch.from_numpy(rng.uniform(size=(77, 2, 3, 3)).astype(np.float32))
    small = KnnSigma(0.5, 1.0, 4, batch_size=5).fit(train)
    big = KnnSigma(0.5, 1.0, 4, batch_size=4096).fit(train)
    torch.testing.assert_close(small(x), big(x), rtol=1e-6, atol=0)
    assert small(x.double()).dtype == small(x).dtype == torch.float32
    assert small(x[:0]).shape == (0,)


def test_state_dict_roundtrip_and_fingerprint(digits):
    train, test = digits
    pca = OrthonormalProjection.from_pca(train, 10)
    original = KnnSigma(0.25, 0.5, k=10, embedding=pca).fit(train)
    expected = original(test)

    class Model(nn.Module):  # stands in for the LightningModule that owns the sigma
        def __init__(self, sigma):
            super().__init__()
            self.sigma = sigma

    buffer = io.BytesIO()
    torch.save(Model(original).state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh = KnnSigma(1.0, 0.0, k=3, embedding=OrthonormalProjection())  # wrong hyper-parameters on purpose
    Model(fresh).load_state_dict(state)
    assert (fresh.sigma_base, fresh.r, fresh.k, fresh.m) == (0.25, 0.5, 10, original.m)
    assert fresh.fingerprint == original.fingerprint and len(fresh.fingerprint) == 64
    assert not fresh.is_fitted
    fresh.fit(train, cache_training=False)
    assert fresh.m == original.m
    torch.testing.assert_close(fresh(test), expected, rtol=1e-6, atol=0)
    idx = torch.arange(20)
    torch.testing.assert_close(fresh.training_sigma(None, idx), original.training_sigma(None, idx))

    state["sigma._extra_state"]["m"] = 1.25  # fit keeps a loaded m, it does not recompute it
    other = KnnSigma(1.0, 0.0, k=3, embedding=OrthonormalProjection())
    Model(other).load_state_dict(state)
    assert other.fit(train).m == 1.25
    other = KnnSigma(1.0, 0.0, k=3, embedding=OrthonormalProjection())
    Model(other).load_state_dict(state)
    with pytest.raises(ValueError, match=r"training set fingerprint [0-9a-f]{16}\.\.\. does not match the fingerprint"):
        other.fit(train[:-1])
    changed = train.clone()
    changed[0, 0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"training set fingerprint [0-9a-f]{16}\.\.\. does not match the fingerprint"):
        other.fit(changed)


def test_loading_other_state_into_fitted_sigma_drops_stale_index():
    train_a, train_b = torch.rand(50, 4), torch.rand(60, 4)
    a = KnnSigma(0.5, 0.2, 3).fit(train_a)
    b = KnnSigma(0.5, 0.2, 3).fit(train_b)
    b.load_state_dict(a.state_dict())
    assert not b.is_fitted and b.m == a.m
    with pytest.raises(ValueError, match=r"training set fingerprint [0-9a-f]{16}\.\.\. does not match the fingerprint"):
        b.fit(train_b)
    a.load_state_dict(a.state_dict())  # same data, index and phi: stays usable
    assert a.is_fitted


def test_constant_sigma_interface():
    sigma = ConstantSigma(0.25)
    x = torch.rand(6, 3, 2, 2)
    assert sigma.fit(x) is sigma and sigma.is_fitted
    assert sigma.semi_elasticity == 0.0 and sigma.label == "RS (sigma=0.25)"
    assert torch.equal(sigma(x), torch.full((6,), 0.25))
    assert torch.equal(sigma.training_sigma(x, torch.arange(6)), torch.full((6,), 0.25))
    restored = ConstantSigma(1.0)
    restored.load_state_dict(sigma.state_dict())
    assert restored.sigma_base == 0.25


def test_semi_elasticity_zero_r_is_constant():
    sigma = KnnSigma(0.3, 0.0, 3, embedding=nn.Linear(4, 2)).fit(torch.rand(20, 4))
    assert sigma.semi_elasticity == 0.0
    assert torch.allclose(sigma(torch.rand(5, 4)), torch.full((5,), 0.3))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_every_device_matches_the_cpu_result(digits, device):
    train, test = digits
    sigma = KnnSigma(0.25, 0.5, k=10).fit(train)
    cpu = sigma(test)
    sigma.to(device)
    other = sigma(test.to(device))
    assert other.device.type == device
    torch.testing.assert_close(other.cpu(), cpu, rtol=1e-6, atol=0)
    idx = torch.arange(10, device=device)
    assert sigma.training_sigma(test[:10].to(device), idx).device.type == device


def test_lightning_checkpoint_roundtrip(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class Model(pl.LightningModule):
        def __init__(self, sigma):
            super().__init__()
            self.sigma, self.net = sigma, nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            noisy = x + self.sigma.training_sigma(x, idx)[:, None] * torch.randn_like(x)
            return nn.functional.cross_entropy(self.net(noisy), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = torch.rand(64, 4), torch.randint(0, 2, (64,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, torch.arange(64)), batch_size=16)
    model = Model(KnnSigma(0.5, 0.2, 3).fit(x))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "sigma.ckpt")
    loaded = Model.load_from_checkpoint(tmp_path / "sigma.ckpt", sigma=KnnSigma(1.0, 0.0, 5))
    assert (loaded.sigma.sigma_base, loaded.sigma.r, loaded.sigma.k, loaded.sigma.m) == (0.5, 0.2, 3, model.sigma.m)
    torch.testing.assert_close(loaded.sigma.fit(x)(x), model.sigma(x))
    with pytest.raises(ValueError, match=r"training set fingerprint [0-9a-f]{16}\.\.\. does not match the fingerprint"):
        Model.load_from_checkpoint(tmp_path / "sigma.ckpt", sigma=KnnSigma(1.0, 0.0, 5)).sigma.fit(x[:-1])


def test_kth_neighbour_statistic_matches_brute_force_and_survives_a_checkpoint():
    rng = np.random.default_rng(5)
    train = torch.from_numpy(rng.normal(size=(300, 2, 3, 2)).astype(np.float32))
    queries = torch.from_numpy(rng.normal(size=(40, 2, 3, 2)).astype(np.float32))
    sigma = KnnSigma(0.5, 0.3, k=7, statistic="kth").fit(train)
    dist = np.sqrt(((queries.reshape(40, -1).double().numpy()[:, None] - train.reshape(300, -1).double().numpy()[None])
                    ** 2).sum(-1))
    np.testing.assert_allclose(sigma.neighbour_distance(queries).numpy(), np.sort(dist, 1)[:, 6], rtol=1e-6)
    restored = KnnSigma(0.5, 0.3, k=7)
    restored.load_state_dict(sigma.state_dict())
    assert restored.statistic == "kth"
    torch.testing.assert_close(restored.fit(train)(queries), sigma(queries), rtol=0, atol=0)
    with pytest.raises(ValueError, match="^statistic must be 'mean' or 'kth', got 'median'$"):
        KnnSigma(0.5, 0.3, k=7, statistic="median")
