"""scripts/study.py end to end on a tiny setting (digits, two seeds, a few points), resuming, and its statistics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.helpers import finished_run_records

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import study_report  # noqa: E402

TINY = ["--config", "digits", "--sigma-b", "0.5", "--r", "0.05", "--objectives", "gaussian", "--seeds", "0", "1",
        "--epochs", "1", "--n", "500", "--skip", "60", "--jobs", "2", "--group", "tiny-study"]


def _study(tmp_path, *extra):
    # WANDB_SERVICE: set in this process by an earlier in-process W&B run; inherited, it would make the
    # study's runs use this process's W&B service instead of their own (and never be finalised)
    env = {k: v for k, v in dict(os.environ, PYTHONPATH=str(REPO), WANDB_SILENT="true").items() if k != "WANDB_SERVICE"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), *TINY, "--out", str(tmp_path / "runs"),
                           "--report", str(tmp_path / "report"), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path):
    result = _study(tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    names = {f"sb0.5_{m}_gaussian_s{s}" for m in ("rs", "r0.05") for s in (0, 1)}
    assert {p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()} == names
    for name in names:
        summary = json.loads((tmp_path / "runs" / name / "certify" / "summary.json").read_text())
        assert summary["num_points"] == 6 and summary["n"] == 500 and summary["radii"] == [0.25 * i for i in range(9)]
        assert summary["semi_elasticity"] == (0.05 if "r0.05" in name else 0.0)
        wandb_files = list((tmp_path / "runs" / name).rglob("*.wandb"))
        assert len(wandb_files) == 2  # fit + certify, both in the study's group
        for folder in {f.parent for f in wandb_files}:
            run = next(r.run for r in finished_run_records(folder) if r.WhichOneof("record_type") == "run")
            assert run.run_group == "tiny-study"
        hparams = json.loads((tmp_path / "runs" / name / "run.json").read_text())
        assert hparams["spec"]["objective"] == "gaussian" and "fit_s" in hparams and "certify_s" in hparams
    report = (tmp_path / "report" / "digits.md").read_text()
    assert "4 of 4 runs finished" in report and "sb 0.5, gaussian: IDRS r=0.05 - RS" in report
    assert (tmp_path / "report" / "digits_tradeoff.png").stat().st_size > 1000
    # resuming: nothing is trained or certified again, the hand-written reading is kept
    before = {n: (tmp_path / "runs" / n / "run.json").read_text() for n in names}
    (tmp_path / "report" / "digits.md").write_text(report.replace("(to be written after looking at the numbers)", "MINE"))
    again = _study(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert before == {n: (tmp_path / "runs" / n / "run.json").read_text() for n in names}
    assert "MINE" in (tmp_path / "report" / "digits.md").read_text()


def _metrics(acr):
    return {"acr": acr}


def test_paired_difference_is_a_t_interval_over_the_common_seeds():
    a = {0: _metrics(0.50), 1: _metrics(0.55), 2: _metrics(0.61), 3: _metrics(0.9)}
    b = {0: _metrics(0.48), 1: _metrics(0.50), 2: _metrics(0.60)}
    mean, (lo, hi), seeds = study_report.paired(a, b, "acr")
    diff = np.array([0.02, 0.05, 0.01])
    half = stats.t.ppf(0.975, 2) * diff.std(ddof=1) / np.sqrt(3)
    assert seeds == 3 and mean == pytest.approx(diff.mean())
    assert (lo, hi) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert study_report.paired({0: _metrics(1.0)}, {0: _metrics(0.0)}, "acr") is None  # one seed: no interval
    assert study_report._fmt_diff((0.03, (0.01, 0.05), 3)).endswith("**")
    assert not study_report._fmt_diff((0.03, (-0.01, 0.07), 3)).endswith("**")
    assert study_report._fmt_diff((0.1, (0.1, 0.1), 3)).endswith("(=)")  # equal on every seed: not "resolved"
    assert not study_report.resolved((0.1, (0.1, 0.1), 3))
