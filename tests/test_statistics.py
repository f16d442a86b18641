"""Tests of lightning_idrs.statistics (NumPy) and lightning_idrs.metric (torchmetrics): certified accuracy, ACR, class-wise curves and the torchmetrics Metric."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lightning_idrs.statistics import (
    abstain_rate,
    average_certified_radius,
    certified_accuracy,
    class_certified_accuracy,
    class_certified_accuracy_matrix,
    default_radius_grid,
    radius_key,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]

# A tiny hand-made result table:
#   point  label  predict  radius  correct  sigma     what it is
#     0      0       0      0.80      1     0.25     certified up to 0.8
#     1      0       1      0.60      0     0.50     wrong prediction (its radius must not count)
#     2      1      -1      0.00      0     0.25     abstained
#     3      1       1      0.00      1     0.50     correct with radius 0: counts at R=0 only
#     4      2       2      0.25      1     0.25     exactly on a grid point
#     5      2       2      1.50      1     0.50
LABELS = [0, 0, 1, 1, 2, 2]
PREDICT = [0, 1, -1, 1, 2, 2]
RADIUS = [0.8, 0.6, 0.0, 0.0, 0.25, 1.5]
CORRECT = [1, 0, 0, 1, 1, 1]
SIGMA = [0.25, 0.5, 0.25, 0.5, 0.25, 0.5]
GRID = [0.0, 0.25, 0.5, 1.0, 2.0]
# Worked by hand from the table (certified = correct and radius >= R):
#   R=0    -> points 0,3,4,5 -> 4/6        R=0.25 -> 0,4,5 -> 3/6      R=0.5 -> 0,5 -> 2/6
#   R=1    -> point 5        -> 1/6        R=2    -> none  -> 0
EXPECTED_CURVE = [4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]
EXPECTED_ACR = (0.8 + 0.0 + 0.25 + 1.5) / 6  # wrong / abstained points contribute 0
EXPECTED_CLASS = {
    0: [1 / 2, 1 / 2, 1 / 2, 0.0, 0.0],  # points 0 (r .8, correct) and 1 (wrong)
    1: [1 / 2, 0.0, 0.0, 0.0, 0.0],  # points 2 (abstain) and 3 (correct, r 0)
    2: [1.0, 1.0, 1 / 2, 1 / 2, 0.0],  # points 4 (r .25) and 5 (r 1.5)
}


def test_hand_example_curve_and_acr():
    np.testing.assert_allclose(certified_accuracy(RADIUS, CORRECT, GRID), EXPECTED_CURVE, rtol=0, atol=1e-15)
    assert average_certified_radius(RADIUS, CORRECT) == pytest.approx(EXPECTED_ACR, abs=1e-15)
    assert abstain_rate(PREDICT) == pytest.approx(1 / 6)


def test_hand_example_classwise():
    got = class_certified_accuracy(LABELS, RADIUS, CORRECT, GRID)
    assert set(got) == {0, 1, 2}
    for k, expected in EXPECTED_CLASS.items():
        np.testing.assert_allclose(got[k], expected, atol=1e-15)
    # an extra class without points: NaN row and count 0 in the matrix, absent from the dict
    matrix, counts = class_certified_accuracy_matrix(LABELS, RADIUS, CORRECT, GRID, num_classes=4)
    assert matrix.shape == (4, len(GRID))
    assert counts.tolist() == [2, 2, 2, 0]
    assert np.isnan(matrix[3]).all()
    assert set(class_certified_accuracy(LABELS, RADIUS, CORRECT, GRID, num_classes=4)) == {0, 1, 2}
    with pytest.raises(ValueError, match="^label 2 is out of range for num_classes=2$"):
        class_certified_accuracy(LABELS, RADIUS, CORRECT, GRID, num_classes=2)  # label 2 out of range


def test_summarize_hand_example_and_json_round_trip():
    s = summarize(LABELS, PREDICT, RADIUS, CORRECT, SIGMA, GRID, num_classes=3)
    assert s["num_points"] == 6
    assert list(s["certified_accuracy"]) == ["0", "0.25", "0.5", "1", "2"]
    np.testing.assert_allclose(list(s["certified_accuracy"].values()), EXPECTED_CURVE, atol=1e-15)
    assert s["acr"] == pytest.approx(EXPECTED_ACR, abs=1e-15)
    assert s["abstain_rate"] == pytest.approx(1 / 6)
    assert s["clean_accuracy"] == pytest.approx(4 / 6)
    assert s["mean_sigma"] == pytest.approx(0.375)
    assert s["class_num_points"] == {"0": 2, "1": 2, "2": 2}
    for k, expected in EXPECTED_CLASS.items():
        np.testing.assert_allclose(list(s["class_certified_accuracy"][str(k)].values()), expected, atol=1e-15)
    # plain Python values only: the dict equals its own strict-JSON round trip
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    for v in (s["acr"], s["abstain_rate"], s["clean_accuracy"], s["mean_sigma"]):
        assert type(v) is float
    assert type(s["num_points"]) is int


def test_curve_is_monotone_nonincreasing():
    rng = np.random.default_rng(0)
    n = 500
    radius = rng.exponential(0.5, n) * (rng.random(n) < 0.8)
    correct = rng.random(n) < 0.7
    grid = default_radius_grid(3.0, 0.05)
    acc = certified_accuracy(radius, correct, grid)
    assert np.all(np.diff(acc) <= 0)
    assert acc[0] == pytest.approx(correct.mean())  # radius >= 0 always, so R=0 gives clean accuracy
    # brute force, point by point, as an independent check of the vectorised version
    brute = [np.mean([c and r >= R for r, c in zip(radius, correct)]) for R in grid]
    np.testing.assert_allclose(acc, brute, atol=1e-15)


def test_abstained_points_are_never_certified():
    # all abstain (radius 0, correct 0): nothing certified at any radius, ACR 0
    n = 7
    assert certified_accuracy(np.zeros(n), np.zeros(n), [0.0, 0.5]).tolist() == [0.0, 0.0]
    assert average_certified_radius(np.zeros(n), np.zeros(n)) == 0.0
    assert abstain_rate(-np.ones(n)) == 1.0
    # a wrong point with a large radius does not count either
    assert certified_accuracy([3.0, 0.1], [0, 1], [0.0, 1.0]).tolist() == [0.5, 0.0]
    # an abstained point claimed correct is a bug upstream
    with pytest.raises(ValueError, match="abstain"):
        summarize([0], [-1], [0.0], [1], [0.25], [0.0])


def test_classwise_equals_overall_with_one_class():
    rng = np.random.default_rng(1)
    n = 200
    radius = rng.uniform(0, 2, n)
    correct = rng.random(n) < 0.6
    grid = default_radius_grid(2.0, 0.25)
    per_class = class_certified_accuracy(np.full(n, 3), radius, correct, grid)
    assert list(per_class) == [3]
    np.testing.assert_allclose(per_class[3], certified_accuracy(radius, correct, grid), atol=1e-15)


def test_classwise_matches_brute_force_on_unsorted_grid():
    rng = np.random.default_rng(2)
    n, k = 300, 4
    labels = rng.integers(0, k, n)
    radius = np.round(rng.uniform(0, 1.5, n), 1)  # many radii exactly on grid values
    correct = rng.random(n) < 0.6
    grid = rng.permutation(default_radius_grid(1.5, 0.1))
    got, counts = class_certified_accuracy_matrix(labels, radius, correct, grid)
    for cls in range(k):
        members = labels == cls
        assert counts[cls] == members.sum()
        brute = [np.mean(correct[members] & (radius[members] >= R)) for R in grid]
        np.testing.assert_allclose(got[cls], brute, atol=1e-15)
    brute_all = [np.mean(correct & (radius >= R)) for R in grid]
    np.testing.assert_allclose(certified_accuracy(radius, correct, grid), brute_all, atol=1e-15)


def test_acr_is_mean_of_radius_times_correct():
    radius = np.array([0.1, 0.2, 0.4, 0.8])
    correct = np.array([True, False, True, True])
    assert average_certified_radius(radius, correct) == pytest.approx((0.1 + 0.4 + 0.8) / 4)


def test_default_grid_and_keys():
    g = default_radius_grid(1.0, 0.25)
    assert g.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert default_radius_grid(0.9, 0.25).tolist() == [0.0, 0.25, 0.5, 0.75]
    g = default_radius_grid(1.0, 0.1)
    assert len(g) == 11 and g[3] == 0.3 and g[7] == 0.7 and g[-1] == 1.0  # no accumulated error
    assert radius_key(0.5) == "0.5" and radius_key(1.0) == "1"
    with pytest.raises(ValueError, match=r"^step must be a positive finite number, got 0\.0$"):
        default_radius_grid(1.0, 0.0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="^no points: the statistics of an empty result set are undefined$"):
        certified_accuracy([], [], [0.0])
    with pytest.raises(ValueError, match="^per-point arrays have different lengths: {'radius': 2, 'correct': 1}$"):
        certified_accuracy([0.1, 0.2], [1], [0.0])
    with pytest.raises(ValueError, match=r"^radius must be >= 0 \(abstained points have radius 0\)$"):
        certified_accuracy([-0.1], [1], [0.0])
    with pytest.raises(ValueError, match=r"^correct must contain only 0/1 \(or booleans\)$"):
        certified_accuracy([0.1], [2], [0.0])
    with pytest.raises(ValueError, match="^the radius grid is empty$"):
        certified_accuracy([0.1], [1], [])
    with pytest.raises(ValueError, match="^no points: the abstain rate of an empty result set is undefined$"):
        abstain_rate([])


# ------------------------------------------------------------------------------------------
# torchmetrics Metric
# ------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def test_metric_two_updates_equals_summarize_of_concatenation():
    from lightning_idrs.metric import CertifiedAccuracy

    m = CertifiedAccuracy(GRID, num_classes=3)
    f64 = torch.float64  # radii as float64 tensors, as the certifier produces them
    m.update(torch.tensor(LABELS[:4]), torch.tensor(PREDICT[:4]), torch.tensor(RADIUS[:4], dtype=f64),
             torch.tensor(SIGMA[:4], dtype=f64), correct=torch.tensor(CORRECT[:4]))
    m.update(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
             torch.tensor([], dtype=f64), torch.tensor([]), correct=torch.tensor([], dtype=torch.long))  # empty
    m.update(np.array(LABELS[4:]), np.array(PREDICT[4:]), np.array(RADIUS[4:]), np.array(SIGMA[4:]))
    got = m.compute()
    expected = summarize(LABELS, PREDICT, RADIUS, CORRECT, SIGMA, GRID, num_classes=3)
    assert got == expected
    np.testing.assert_allclose(list(got["certified_accuracy"].values()), EXPECTED_CURVE, atol=1e-15)


def test_metric_keeps_float64_radii():
    from lightning_idrs.metric import CertifiedAccuracy

    # float32(0.7) < 0.7: a float32 state would drop this point from the R = 0.7 column
    m = CertifiedAccuracy([0.7])
    m.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.5]))
    assert m.compute()["certified_accuracy"] == {"0.7": 1.0}


def test_metric_deduplicates_by_idx_and_resets():
    from lightning_idrs.metric import CertifiedAccuracy

    m = CertifiedAccuracy(GRID)
    m.update(LABELS, PREDICT, RADIUS, SIGMA, idx=list(range(6)))
    # a padded duplicate of points 0 and 1 (as DistributedSampler adds), with different values
    m.update([0, 0], [1, 1], [0.0, 0.0], [0.25, 0.25], idx=[0, 1])
    assert m.compute() == summarize(LABELS, PREDICT, RADIUS, CORRECT, SIGMA, GRID)
    m.reset()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="no points"):
        m.compute()


def test_metric_compute_without_data_raises():
    from lightning_idrs.metric import CertifiedAccuracy

    m = CertifiedAccuracy(GRID)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no points"):
        m.compute()
    m.update([], [], [], [])
    with pytest.raises(ValueError, match="no points"):
        m.compute()
    with pytest.raises(ValueError, match=r"^update\(\): all arguments must have the same number of points$"):
        m.update([0, 1], [0], [0.1], [0.2])


def test_metric_takes_certify_rows_and_drops_markers():
    from lightning_idrs.metric import ROW_FIELDS, CertifiedAccuracy, CertifyRows
    from lightning_idrs.statistics import summarize_columns

    columns = {"idx": np.arange(6.0), "label": LABELS, "predict": PREDICT, "radius": RADIUS, "correct": CORRECT,
               "sigma": SIGMA, "p_a_lower": np.full(6, 0.9), "time": np.full(6, 0.1), "samples": np.arange(6) + 100.0}
    rows = np.column_stack([np.asarray(columns[name], dtype=np.float64) for name in ROW_FIELDS])
    m = CertifiedAccuracy(GRID, num_classes=3)
    m.update(rows[:4])
    m.update(np.vstack([rows[4:], rows[:1] * 0, np.full((1, len(ROW_FIELDS)), -2.0)]))  # a repeat of idx 0, a marker
    assert m.compute() == summarize_columns(columns, GRID, num_classes=3)
    assert m.compute()["mean_samples"] == 102.5 and m.compute()["num_points"] == 6
    gather = CertifyRows()
    gather.update(rows)
    np.testing.assert_array_equal(gather.compute(), rows)
    with pytest.raises(ValueError, match=r"^update\(\): rows must have shape \[points, 9\]"):
        gather.update(rows[:, :5])


_DDP_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from lightning_idrs.metric import CertifiedAccuracy
    rank, init, out, grid = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    table = json.loads(sys.argv[5])
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    both = CertifiedAccuracy(grid, num_classes=3)
    only0 = CertifiedAccuracy(grid, num_classes=3)
    lab, pred, rad, cor, sig = table
    shard = slice(0, 2) if rank == 0 else slice(2, None)     # unequal shards: 2 and 4 points
    both.update(lab[shard], pred[shard], torch.tensor(rad[shard], dtype=torch.float64), sig[shard],
                correct=cor[shard])
    if rank == 0:                                              # rank 1 never updates `only0`
        only0.update(lab, pred, torch.tensor(rad, dtype=torch.float64), sig, correct=cor)
    res = {"both": both.compute(), "only0": only0.compute(), "local_n": len(both.gathered())}
    dist.barrier()
    dist.destroy_process_group()
    json.dump(res, open(out, "w"))
    """
)


@pytest.mark.slow
def test_metric_gathers_shards_under_ddp(tmp_path):
    table = [LABELS, PREDICT, RADIUS, CORRECT, SIGMA]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    init = "file://" + str(tmp_path / "rendezvous")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DDP_WORKER, str(rank), init, str(tmp_path / f"out{rank}.json"),
             json.dumps(GRID), json.dumps(table)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers timed out")
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]
    expected = summarize(LABELS, PREDICT, RADIUS, CORRECT, SIGMA, GRID, num_classes=3)
    for rank in range(2):
        res = json.loads((tmp_path / f"out{rank}.json").read_text())
        assert res["both"] == expected, f"rank {rank}"
        assert res["only0"] == expected, f"rank {rank}"
        assert res["local_n"] == (2 if rank == 0 else 4)  # states are restored to the local shard after compute


_SHARDED_WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, torch.distributed as dist
    from torch import nn
    from lightning_idrs import ConstantSigma, SmoothedClassifier
    from lightning_idrs.arguments import UsageError
    from lightning_idrs.sharding import CertifySettings, certify_sharded, plan_chunks
    rank, init, out, fail_at = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)

    class Points(torch.utils.data.Dataset):  # point `fail_at` cannot be read: its rank fails
        def __len__(self):
            return 7
        def __getitem__(self, i):
            if i == fail_at:
                raise UsageError(f"point {i} is unreadable")
            return torch.full((2,), float(i)), i % 2

    torch.manual_seed(0)
    smoothed = SmoothedClassifier(nn.Linear(2, 2), ConstantSigma(0.5), 2)
    settings = CertifySettings(n0=8, n=32, batch_size=16, points_per_chunk=2)
    rounds, error = [], None
    try:
        for rows in certify_sharded(smoothed, Points(), plan_chunks(np.arange(7), 2), settings, "cpu", rank, 2):
            rounds.append(rows[:, 0].tolist())
    except UsageError as failure:
        error = str(failure)
    dist.destroy_process_group()
    json.dump({"rounds": rounds, "error": error}, open(out, "w"))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [-1, 6])
def test_certify_sharded_gathers_rounds_in_chunk_order_and_stops_every_rank_on_a_failure(tmp_path, fail_at):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    init = "file://" + str(tmp_path / "rendezvous")
    procs = [subprocess.Popen([sys.executable, "-c", _SHARDED_WORKER, str(rank), init, str(tmp_path / f"{rank}.json"),
                               str(fail_at)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    if fail_at < 0:  # chunks (0,1) (2,3) | (4,5) (6): two rounds, every rank sees every row in chunk order
        assert results[0] == results[1] == {"rounds": [[0, 1, 2, 3], [4, 5, 6]], "error": None}
    else:  # chunk 3 (point 6) is rank 1's in round 2: rank 1 raises its error, rank 0 is told and stops too
        assert [r["rounds"] for r in results] == [[[0, 1, 2, 3]]] * 2
        assert results[1]["error"] == "point 6 is unreadable"
        assert results[0]["error"] == "certification stopped: another process failed (its error is printed above)"
