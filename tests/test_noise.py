"""Certification's noise: Philox4x32-10 against the published answers, normals that are normal, and
streams that are distinct by construction (never shared between points, seeds, phases or samples)."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_idrs import ConstantSigma, SmoothedClassifier, philox
from lightning_idrs.philox import (WORD, box_muller, box_muller_numpy, normals, philox4x32, philox4x32_numpy,
                                   standard_normal_pairs, uniforms, uniforms_numpy)
from lightning_idrs.sharding import CertifySettings, certify_chunks
from lightning_idrs.smoothing import PointNoise

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#: Random123's known-answer vectors (its kat_vectors file): counter (4 words), key (2 words) -> output
KAT = {
    10: ["00000000 00000000 00000000 00000000 00000000 00000000 6627e8d5 e169c58d bc57ac4c 9b00dbd8",
         "ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 408f276d 41c83b0e a20bc7c6 6d5451fd",
         "243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 d16cfe09 94fdcceb 5001e420 24126ea1"],
    7: ["00000000 00000000 00000000 00000000 00000000 00000000 5f6fb709 0d893f64 4f121f81 4f730a48",
        "ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 5207ddc2 45165e59 4d8ee751 8c52f662",
        "243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 4dfccaba 190a87f0 c47362ba b6b5242a"],
}


def reference_philox(counter, key, rounds=10):
    """Philox4x32 in Python integers, straight from Salmon et al. (2011): the reference of the tests."""
    c, (k0, k1) = list(counter), key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) % WORD, (k1 + 0xBB67AE85) % WORD
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 % WORD, (p0 >> 32) ^ c[3] ^ k1, p0 % WORD]
    return c


def reference_noise(seed, point, phase, sample, dim):
    """The noise of one sample as docs/math.md defines it, in Python floats (math.log, math.cos)."""
    values = []
    for pair in range(-(-dim // 2)):
        w = reference_philox([pair, sample, phase, 0], [point, seed])
        u = ((w[0] << 21) + (w[1] >> 11) + 1) / 2**53
        angle = 2 * math.pi * (((w[2] << 21) + (w[3] >> 11)) / 2**53)
        radius = math.sqrt(-2 * math.log(u))
        values += [radius * math.cos(angle), radius * math.sin(angle)]
    return np.array(values[:dim])


@pytest.mark.parametrize("rounds", [10, 7])
@pytest.mark.parametrize("device", DEVICES)
def test_philox_gives_random123s_known_answers(rounds, device):
    for line in KAT[rounds]:
        words = [int(w, 16) for w in line.split()]
        inputs, expected = words[:6], words[6:]
        assert reference_philox(inputs[:4], inputs[4:], rounds) == expected
        got = philox4x32(*(torch.tensor(w, device=device) for w in inputs), rounds=rounds)
        assert [int(w) for w in got] == expected
        if device == "cpu":
            assert [int(w) for w in philox4x32_numpy(*(np.uint64(w) for w in inputs), rounds=rounds)] == expected


def test_torch_and_numpy_philox_agree_bit_for_bit_on_random_and_extreme_words():
    """The integers and the uniforms bit for bit, the normals to the last float64 places."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, WORD, size=(6, 20_000), dtype=np.uint64)
    words[:, :64] = rng.choice(np.array([0, 1, 0xFFFF, 0x10000, WORD - 1], dtype=np.uint64), size=(6, 64))
    with_torch = philox4x32(*(torch.from_numpy(w.astype(np.int64)) for w in words))
    with_numpy = philox4x32_numpy(*words)
    for a, b in zip(with_torch, with_numpy):
        assert a.dtype == torch.int64 and ((a >= 0) & (a < WORD)).all()
        np.testing.assert_array_equal(a.numpy(), b.astype(np.int64))
    for j in range(0, 20_000, 997):
        assert [int(w[j]) for w in with_torch] == reference_philox(words[:4, j].tolist(), words[4:, j].tolist())
    u, t = np.empty(20_000), np.empty(20_000)
    uniforms_numpy(*with_numpy, u, t)
    for mine, theirs in zip((u, t), uniforms(*with_torch)):  # exact: 53-bit integers scaled by 2^-53
        np.testing.assert_array_equal(mine, theirs.numpy())
    assert u.min() > 0 and u.max() <= 1 and t.min() >= 0 and t.max() < 1
    pairs = np.empty((20_000, 2))
    box_muller_numpy(u, t, pairs)  # NumPy's transcendentals against torch's: the last float64 places
    np.testing.assert_allclose(pairs, box_muller(torch.from_numpy(u), torch.from_numpy(t)).numpy(), rtol=1e-14,
                               atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_the_noise_is_the_documented_function_of_seed_point_phase_and_sample(device):
    """Every coordinate (odd dimension too) against a pure-Python transcription of docs/math.md's definition."""
    cases = [(0, 0, 0, 0), (7, 3, 1, 999), (WORD - 1, WORD - 1, WORD - 1, WORD - 1), (123, 456, 2, 31_622)]
    for seed, point, phase, sample in cases:
        got = normals(seed, torch.tensor([point], device=device), phase, torch.tensor([sample]), (3, 7), torch.float64)
        expected = reference_noise(seed, point, phase, sample, 21)
        np.testing.assert_allclose(got.cpu().numpy().reshape(-1), expected, rtol=1e-14, atol=1e-15)
        got32 = normals(seed, torch.tensor([point], device=device), phase, torch.tensor([sample]), (21,), torch.float32)
        np.testing.assert_allclose(got32.cpu().numpy()[0], expected.astype(np.float32), rtol=2**-23, atol=0)


def test_normals_pass_goodness_of_fit_tests_that_a_one_percent_error_fails():
    """2^21 values of 4,096 streams (64 points x 4 phases x 16 samples, 512 coordinates each): the KS test
    against N(0, 1), the tail fractions beyond 2, 3 and 4, and the squared radius of each Box-Muller pair
    (chi-square, 2 dof) and its angle (uniform). The same statistics reject the values scaled by 1.01 or
    shifted by 0.01 (planted here), so the tests have the power to see an error of that size."""
    points, samples = torch.arange(64).repeat_interleave(16), torch.arange(16).repeat(64)
    phases = [normals(5, points, phase, samples, (512,), torch.float64) for phase in range(4)]
    z = torch.cat(phases).numpy().reshape(-1)

    def rejected(values):
        p_values = [stats.kstest(values, "norm").pvalue]
        for t in (2.0, 3.0, 4.0):  # two-sided tail counts against their binomial law
            expected = 2 * stats.norm.sf(t)
            count = int((np.abs(values) > t).sum())
            p_values.append(stats.binomtest(count, len(values), expected).pvalue)
        pairs = values.reshape(-1, 2)
        p_values.append(stats.kstest((pairs**2).sum(1), "chi2", args=(2,)).pvalue)
        p_values.append(stats.kstest(np.arctan2(pairs[:, 1], pairs[:, 0]), "uniform", args=(-np.pi, 2 * np.pi)).pvalue)
        return min(p_values) < 1e-4 / len(p_values)

    assert not rejected(z)
    assert abs(z.mean()) < 5 / math.sqrt(len(z)) and abs(z.var() - 1) < 5 * math.sqrt(2 / len(z))
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / len(z)) and abs(stats.skew(z)) < 5 * math.sqrt(6 / len(z))
    assert rejected(z * 1.01) and rejected(z + 0.01)


def test_the_tails_end_where_the_docs_say():
    """u = 2^-53 (the smallest uniform) gives the largest radius sqrt(106 log 2); u = 1 gives 0."""
    zero, top = torch.tensor([0]), torch.tensor([WORD - 1])
    smallest = standard_normal_pairs(zero, zero, zero, zero)
    assert smallest.tolist() == [[pytest.approx(math.sqrt(106 * math.log(2)), rel=1e-15), 0.0]]
    largest = standard_normal_pairs(top, top, zero, zero)
    assert abs(largest).max() < 1e-7
    z = normals(0, torch.arange(200), 1, torch.zeros(200, dtype=torch.int64), (1000,), torch.float64)
    assert z.abs().max() <= math.sqrt(106 * math.log(2)) and torch.isfinite(z).all()


def distinct_rows(noise: torch.Tensor) -> int:
    rows = noise.reshape(len(noise), -1).cpu().numpy()
    return len(np.unique(rows, axis=0))


def test_no_two_streams_of_a_run_coincide_over_points_phases_and_samples():
    """300 points x 7 phases x 100 samples, 8 coordinates each: 210,000 different vectors, and no coordinate
    correlated between neighbouring points, phases or samples."""
    points = torch.arange(300).repeat_interleave(100)
    samples = torch.arange(100).repeat(300)
    noise = torch.stack([normals(11, points, phase, samples, (8,), torch.float64) for phase in range(7)])
    assert distinct_rows(noise.reshape(-1, 8)) == 7 * 300 * 100
    assert len(np.unique(noise.numpy().reshape(-1))) == noise.numel()  # no value repeats either
    grid = noise.reshape(7, 300, 100, 8)
    bound = 5 / math.sqrt(grid[:, :, :, 0].numel())
    for a, b in [(grid[1:], grid[:-1]), (grid[:, 1:], grid[:, :-1]), (grid[:, :, 1:], grid[:, :, :-1])]:
        assert abs(float((a * b).mean())) < 5 / math.sqrt(a.numel())  # neighbours: no correlation
    assert abs(float((grid[..., 0] * grid[..., 1]).mean())) < bound  # the two normals of a pair


def test_seed_and_point_enter_the_key_separately():
    """(seed, point) and (seed + 1, point - 1) (or any other (seed', point') with the same sum) differ."""
    for seed, point in [(0, 1), (5, 100), (WORD - 2, 1), (0, WORD - 1)]:
        one = normals(seed, torch.tensor([point]), 1, torch.tensor([0]), (16,), torch.float64)
        other = normals(seed + 1, torch.tensor([point - 1]), 1, torch.tensor([0]), (16,), torch.float64)
        assert not torch.isclose(one, other).any()
    streams = [normals(seed, torch.arange(50), 0, torch.zeros(50, dtype=torch.int64), (4,), torch.float64)
               for seed in range(50)]
    assert distinct_rows(torch.cat(streams)) == 2500  # every (seed, point) of a 50 x 50 grid: its own noise


def test_a_samples_noise_does_not_depend_on_the_batch_or_the_other_points():
    x = torch.zeros(5, 3, 4)
    whole = PointNoise(3, [10, 11, 12, 13, 14])
    reference = torch.cat([eps for _, eps in whole.batches(x, 37, 1000, phase=1)]).reshape(5, 37, 3, 4)
    for batch_size in (1, 7, 36, 37, 38, 185):
        owners, pieces = zip(*whole.batches(x, 37, batch_size, phase=1))
        assert all(len(o) <= batch_size for o in owners)
        torch.testing.assert_close(torch.cat(pieces).reshape(5, 37, 3, 4), reference, rtol=0, atol=0)
    alone = torch.cat([eps for _, eps in PointNoise(3, [12]).batches(x[:1], 37, 10, phase=1)])
    torch.testing.assert_close(alone, reference[2], rtol=0, atol=0)
    subset = torch.cat([eps for _, eps in whole.subset([4, 0]).batches(x[:2], 37, 50, phase=1)]).reshape(2, 37, 3, 4)
    torch.testing.assert_close(subset, reference[[4, 0]], rtol=0, atol=0)
    fewer = torch.cat([eps for _, eps in whole.batches(x, 20, 64, phase=1)]).reshape(5, 20, 3, 4)
    torch.testing.assert_close(fewer, reference[:, :20], rtol=0, atol=0)  # sample j is sample j, whatever n


class NoiseRecorder(nn.Module):
    """Records every noisy input it is shown (x = 0, sigma = 1: the noise itself) and answers class 1
    when the first coordinate is positive."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        score = x.flatten(1)[:, 0]
        return torch.stack([-score, score], dim=1)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, size, dim):
        self.size, self.dim = size, dim

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return torch.zeros(self.dim), 1


@pytest.mark.parametrize("sequential", [False, True], ids=["fixed-n", "sequential"])
def test_selection_estimation_and_every_stage_draw_different_samples_on_the_certify_path(sequential):
    """The real path (certify_chunks -> PointNoise -> SmoothedClassifier): every noisy input of a run of 40
    points is different (selection, estimation and each sequential stage never reuse a sample), and each
    point sees exactly n0 + its samples."""
    recorder = NoiseRecorder()
    smoothed = SmoothedClassifier(recorder, ConstantSigma(1.0), num_classes=2)
    settings = CertifySettings(n0=50, n=5000, alpha=0.001, batch_size=3000, seed=2, points_per_chunk=8,
                               sequential=sequential)
    chunks = [(c, np.arange(40)[c * 8:(c + 1) * 8]) for c in range(5)]
    certified = list(certify_chunks(smoothed, ListDataset(40, 6), chunks, settings, "cpu",
                                    radii=[0.25, 0.5, 0.75, 1.0] if sequential else None))
    seen = torch.cat(recorder.seen)
    expected = sum(50 * len(c.indices) + int(c.certificates.samples.sum()) for c in certified)
    assert len(seen) == expected
    if sequential:  # pA = 1/2 (x = 0 on the boundary): points go on to the later stages
        assert set(np.concatenate([c.certificates.samples for c in certified])) == {1000, 3162, 5000}
    assert distinct_rows(seen) == len(seen)


def test_the_seed_and_the_indices_are_bounded():
    PointNoise(WORD - 1, [0, WORD - 1])  # the largest of each
    with pytest.raises(ValueError, match=r"^seed must be an integer from 0 to 4294967295 \(2\^32 - 1\), got 4294967296$"):
        PointNoise(WORD, [0])
    with pytest.raises(ValueError, match=r"^seed must be an integer from 0 to 4294967295 \(2\^32 - 1\), got -1$"):
        PointNoise(-1, [0])
    for keys in ([WORD], [-1], [0.5]):
        with pytest.raises(ValueError, match=r"^PointNoise keys must be indices in the data set, integers in \[0, 2\^32\)"):
            PointNoise(0, keys)
    with pytest.raises(ValueError, match=r"^seed must be an integer from 0 to 4294967295"):
        CertifySettings(seed=2**40)
    noise = PointNoise(0, [0])
    with pytest.raises(ValueError, match=r"^PointNoise draws at most 2\^32 samples"):
        next(noise.batches(torch.zeros(1, 3), WORD + 1, 10, phase=1))
    with pytest.raises(ValueError, match=r"^PointNoise draws at most 2\^32 samples"):
        next(noise.batches(torch.zeros(1, 3), 10, 10, phase=WORD))


def test_a_failed_compile_falls_back_to_the_same_noise_with_one_warning(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(philox, "_compiled", {"function": None, "failed": False})
    args = (9, torch.arange(4), 1, torch.arange(4), (5,), torch.float32)
    with pytest.warns(RuntimeWarning, match=r"^torch.compile of the noise generator failed \(no compiler here\); "):
        first = normals(*args, compiled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        second = normals(*args, compiled=True)
    torch.testing.assert_close(first, normals(*args, compiled=False), rtol=2**-23, atol=0)  # NumPy's on CPU
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_noise_compiled_and_eager_match_the_cpu_noise():
    """The same integers everywhere; the transcendentals of CPU and CUDA (compiled or not) may differ in the
    last float64 place, which the float32 cast removes for nearly every value."""
    points, samples = torch.arange(3000) // 30, torch.arange(3000) % 30
    cpu = normals(4, points, 2, samples, (3, 32, 32), torch.float32)
    for compiled in (True, False):
        gpu = normals(4, points.cuda(), 2, samples, (3, 32, 32), torch.float32, compiled=compiled).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=2**-22, atol=1e-7)
        assert (gpu != cpu).float().mean() < 1e-5


def test_the_generator_traces_as_one_graph_with_dynamic_shapes():
    """What torch.compile needs on CUDA: no graph break, no data-dependent control flow, no recompilation for
    another batch size (checked with Dynamo's tracing alone, whose output must be the eager function's)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    traced = torch.compile(philox._pairs_torch, backend=counter, fullgraph=True, dynamic=True)
    for rows, pairs, phase in [(5, 7, 1), (9, 12, 3), (2, 3, 0)]:
        args = (torch.arange(rows).reshape(-1, 1) * 3, torch.tensor(11), torch.arange(rows).reshape(-1, 1),
                torch.tensor(phase), torch.arange(pairs).reshape(1, -1), torch.float32)
        torch.testing.assert_close(traced(*args), philox._pairs_torch(*args), rtol=0, atol=0)
    assert counter.frame_count == 1
