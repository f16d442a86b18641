"""``python -m lightning_idrs doctor [--gpu]``: the installation check users run, as they run it."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_idrs.commands import doctor
from lightning_idrs.smoothing import Certificates

REPO = Path(__file__).resolve().parents[1]


def run_doctor(tmp_path, *args, pythonpath=()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, pythonpath), str(REPO)]), HOME=str(tmp_path))
    return subprocess.run([sys.executable, "-m", "lightning_idrs", "doctor", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without a GPU")
def test_doctor_gpu_without_a_gpu_says_so_after_the_cpu_checks_and_exits_0(tmp_path):
    result = run_doctor(tmp_path, "--gpu")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    status = {line[5:].split(":")[0]: line[:5].strip() for line in lines if line[:5].strip() in ("ok", "FAIL", "skip")}
    assert status == {"versions": "ok", "libraries": "ok", "faiss": "ok", "cpu": "ok", "gpu": "ok", "knn faiss cpu": "ok",
                      "knn torch cpu": "ok", "certify cpu": "ok", "gpu checks": "skip"}, lines
    assert "bit-identical to faiss" in result.stdout and "kNN sigma (auto backend)" in result.stdout
    assert f"torch {torch.__version__}" in lines[0] and "lightning_idrs 0." in lines[0]
    assert "skip gpu checks: no CUDA GPU is visible to torch" in result.stdout
    assert lines[-1] == "doctor: all checks passed"
    rows = [line.split() for line in lines if line.startswith("     ") and line.split()[0] in ("0", "1")]
    assert len(rows) == 2 and all(len(row) == 8 for row in rows)  # point, fp32 row | bf16 row
    assert list(tmp_path.iterdir()) == [], "doctor writes nothing (not even to HOME)"


@pytest.mark.slow
def test_doctor_with_a_faiss_that_cannot_import_fails_that_check_and_still_certifies(tmp_path):
    fake = tmp_path / "fake"
    (fake / "faiss").mkdir(parents=True)
    (fake / "faiss" / "__init__.py").write_text("raise ImportError('libfaiss.so: cannot open shared object file')\n")
    home = tmp_path / "home"
    home.mkdir()
    result = run_doctor(home, pythonpath=[fake])
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "FAIL faiss: faiss failed to import: ImportError: libfaiss.so: cannot open shared object file (faiss-" \
        in result.stdout and "pip install 'lightning_idrs[cpu]'" in result.stdout
    assert "ok   knn torch cpu:" in result.stdout and "knn faiss cpu" not in result.stdout
    assert "ok   certify cpu:" in result.stdout and "kNN sigma (torch backend)" in result.stdout
    assert result.stdout.splitlines()[-1] == "doctor: 1 check(s) failed: faiss"
    assert "Traceback" not in result.stdout + result.stderr


def test_two_owners_of_the_faiss_module_fail_with_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "faiss_owners", lambda: ["faiss-cpu", "faiss-cuda"])
    report = doctor.Report()
    assert doctor.check_faiss(report) is False and report.failed == ["faiss"]
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.startswith("FAIL faiss: 2 packages own the faiss module (faiss-cpu, faiss-cuda)")
    assert "pip uninstall -y faiss-cpu faiss-cuda" in out


def test_the_knn_check_fails_when_the_index_disagrees_with_brute_force(monkeypatch, capsys):
    assert doctor.check_knn(doctor.Report(), "cpu") and doctor.check_knn(doctor.Report(), "cpu", "torch")
    exact = doctor.brute_force_knn
    monkeypatch.setattr(doctor, "brute_force_knn", lambda *a: exact(*a) * (1 + 1e-7))
    report = doctor.Report()
    assert not doctor.check_knn(report, "cpu") and not doctor.check_knn(report, "cpu", "torch")
    assert report.failed == ["knn faiss cpu", "knn torch cpu"]


def test_rows_with_an_invalid_radius_fail(capsys):
    def rows(radius, prediction):
        n = len(radius)
        return Certificates(np.array(prediction), np.full(n, 0.9), np.full(n, 0.25), np.array(radius), np.full(n, 10))

    good = rows([0.3, 0.0], [1, -1])
    report = doctor.Report()
    assert doctor.compare_rows(report, "certify cpu", good, rows([0.31, 0.0], [1, -1]))
    assert "agree on 2 predictions, max |radius difference| 0.0100" in capsys.readouterr().out
    assert not doctor.compare_rows(report, "certify cpu", good, rows([0.3, 0.2], [1, -1]))  # radius for an abstention
    assert not doctor.compare_rows(report, "certify cpu", good, rows([-0.1, 0.0], [1, -1]))
    assert not doctor.compare_rows(report, "certify cpu", rows([np.nan, 0.0], [1, -1]), good)
    assert report.failed == ["certify cpu"] * 3


def test_a_bad_argument_is_one_error_and_exit_2(capsys):
    assert doctor.main(["--gpus"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1].endswith("error: unrecognized arguments: --gpus") and not captured.out
