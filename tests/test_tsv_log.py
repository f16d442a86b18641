"""Tests of lightning_idrs.tsv_log (resumable crash-safe TSV log, settings) and of summary.json / PNGs (reporting)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lightning_idrs.reporting import (ReportOptions, curve_from_tsv_columns, decision_grid, plot_curves, radius_grid,
                                      read_summary, report_radii, write_summary)
from lightning_idrs.statistics import certified_accuracy
from lightning_idrs.tsv_log import SETTINGS_NAME, TSV_HEADER, TSV_NAME, CertifyLog, CertifyRow, format_row, read_tsv

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"sigma_base": 0.25, "semi_elasticity": 0.01, "alpha": 0.001, "n0": 100, "n": 1000,
            "checkpoint": {"path": "model.ckpt", "sha256": "abc"}}

# Deterministic rows: the same function runs in the test and in the killed subprocess. The floats
# have many digits, to check that they survive the file exactly.
ROW_SOURCE = textwrap.dedent(
    """
    def expected_row(j):
        predict = -1 if j % 5 == 0 else j % 10
        radius = 0.0 if predict == -1 else j / 7.0
        return (j, j % 10, predict, radius, int(predict == j % 10), 0.25 * (1 + j / 1013.0),
                0.5 + (j % 97) / 197.0, j * 1e-3 + 1 / 3, 1000 * (1 + j % 5))
    """
)
exec(ROW_SOURCE)  # defines expected_row


def rows(start, stop):
    return [expected_row(j) for j in range(start, stop)]  # noqa: F821


def file_lines(path):
    data = Path(path).read_bytes()
    assert data.endswith(b"\n"), "file must end with a complete line"
    return data.decode().split("\n")[:-1]


# ------------------------------------------------------------------------------------------
# basic log behaviour
# ------------------------------------------------------------------------------------------
def test_append_and_reopen(tmp_path):
    with CertifyLog(tmp_path / "out", SETTINGS) as log:
        assert log.done == set() and log.rows == []
        assert log.append(rows(0, 3)) == 3
        assert log.append([dict(zip(TSV_HEADER, r)) for r in rows(3, 5)]) == 2  # mappings work too
        assert log.append([]) == 0
        assert log.done == {0, 1, 2, 3, 4}
    lines = file_lines(tmp_path / "out" / TSV_NAME)
    assert lines[0] == "\t".join(TSV_HEADER)
    assert len(lines) == 6
    # settings as given (tuple -> list etc. normalised by JSON) resume fine
    with CertifyLog(tmp_path / "out", dict(SETTINGS)) as log:
        assert log.done == {0, 1, 2, 3, 4}
        assert [tuple(r) for r in log.rows] == rows(0, 5)  # exact float round trip
        assert isinstance(log.rows[2], CertifyRow) and log.rows[2].p_a_lower == rows(2, 3)[0][6]
        assert log.repaired is None
        log.append(rows(5, 6))
    cols = read_tsv(tmp_path / "out" / TSV_NAME)
    assert cols["idx"].tolist() == list(range(6))
    assert cols["idx"].dtype == np.int64 and cols["radius"].dtype == np.float64
    np.testing.assert_array_equal(cols["radius"], [r[3] for r in rows(0, 6)])
    np.testing.assert_array_equal(cols["p_a_lower"], [r[6] for r in rows(0, 6)])


def test_format_row_round_trips_floats():
    r = (7, 3, 3, 0.1 + 0.2, 1, 1 / 3, 0.9999999999999999, 12.345678901234567, 100000)
    line = format_row(r)
    assert line.endswith("\n") and line.count("\t") == 8
    fields = line.rstrip("\n").split("\t")
    assert [float(fields[k]) for k in (3, 5, 6, 7)] == [r[3], r[5], r[6], r[7]]
    with pytest.raises(ValueError, match=r"^row must have 9 fields \('idx', .*, got 3$"):
        format_row((1, 2, 3))
    with pytest.raises(ValueError, match="^correct must be 0 or 1, got 2$"):
        format_row((1, 0, 0, 0.5, 2, 0.25, 0.9, 1.0, 10))
    with pytest.raises(ValueError, match=r"^field 'idx' must be an integer, got 1\.5$"):
        format_row((1.5, 0, 0, 0.5, 1, 0.25, 0.9, 1.0, 10))


def test_duplicate_append_is_refused_and_writes_nothing(tmp_path):
    with CertifyLog(tmp_path, SETTINGS) as log:
        log.append(rows(0, 3))
        size = (tmp_path / TSV_NAME).stat().st_size
        with pytest.raises(ValueError, match=r"idx already in .*certify.tsv: \[2\]"):
            log.append(rows(3, 5) + rows(2, 3))  # 2 is done: the whole batch is refused
        with pytest.raises(ValueError, match=r"append\(\): the batch repeats an idx"):
            log.append(rows(3, 4) * 2)
        assert (tmp_path / TSV_NAME).stat().st_size == size
        assert log.done == {0, 1, 2}


def test_torn_last_line_is_dropped_and_next_append_is_clean(tmp_path):
    with CertifyLog(tmp_path, SETTINGS) as log:
        log.append(rows(0, 5))
    torn = format_row(expected_row(5))[:-9]  # noqa: F821  - a partial line, no newline
    with open(tmp_path / TSV_NAME, "a") as fh:
        fh.write(torn)
    # a read-only reader ignores it without touching the file
    assert read_tsv(tmp_path / TSV_NAME)["idx"].tolist() == [0, 1, 2, 3, 4]
    assert (tmp_path / TSV_NAME).read_text().endswith(torn)
    with CertifyLog(tmp_path, SETTINGS) as log:
        assert log.done == {0, 1, 2, 3, 4}
        assert log.repaired is not None
        log.append(rows(5, 8))
    lines = file_lines(tmp_path / TSV_NAME)
    assert lines[1:] == [format_row(r).rstrip("\n") for r in rows(0, 8)]


def test_malformed_last_line_with_newline_is_dropped(tmp_path):
    with CertifyLog(tmp_path, SETTINGS) as log:
        log.append(rows(0, 2))
    with open(tmp_path / TSV_NAME, "ab") as fh:
        fh.write(b"2\t1\t\x00\x00\n")  # wrong field count (e.g. zero-filled block after a power loss)
    with CertifyLog(tmp_path, SETTINGS) as log:
        assert log.done == {0, 1}
        log.append(rows(2, 3))
    assert read_tsv(tmp_path / TSV_NAME)["idx"].tolist() == [0, 1, 2]


def test_corruption_before_the_last_line_raises(tmp_path):
    with CertifyLog(tmp_path, SETTINGS) as log:
        log.append(rows(0, 2))
    lines = (tmp_path / TSV_NAME).read_text().split("\n")
    lines.insert(2, "garbage")
    (tmp_path / TSV_NAME).write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"line 3 is malformed \(.*\); the file is corrupted"):
        CertifyLog(tmp_path, SETTINGS)
    with pytest.raises(ValueError, match=r"line 3 is malformed \(.*\); the file is corrupted"):
        read_tsv(tmp_path / TSV_NAME)


def test_torn_header_is_rewritten(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps(SETTINGS))
    (tmp_path / TSV_NAME).write_text("idx\tlabel\tpre")  # killed while writing the header
    with CertifyLog(tmp_path, SETTINGS) as log:
        assert log.done == set()
        log.append(rows(0, 1))
    assert file_lines(tmp_path / TSV_NAME) == ["\t".join(TSV_HEADER), format_row(expected_row(0)).rstrip()]  # noqa: F821


def test_different_settings_are_refused(tmp_path):
    with CertifyLog(tmp_path, SETTINGS) as log:
        log.append(rows(0, 2))
    other = dict(SETTINGS, sigma_base=0.5, checkpoint={"path": "model.ckpt", "sha256": "def"})
    with pytest.raises(ValueError) as err:
        CertifyLog(tmp_path, other)
    msg = str(err.value)
    assert "sigma_base" in msg and "checkpoint.sha256" in msg and "--certify.out" in msg
    assert "alpha" not in msg and "n0" not in msg  # only the differing keys are named
    with pytest.raises(ValueError, match="max_points: absent in the directory, 10 now"):
        CertifyLog(tmp_path, dict(SETTINGS, max_points=10))  # an added key is a difference too
    # nothing was changed by the refused opens
    assert json.loads((tmp_path / SETTINGS_NAME).read_text()) == SETTINGS
    assert read_tsv(tmp_path / TSV_NAME)["idx"].tolist() == [0, 1]


def test_header_mismatch_is_refused(tmp_path):
    (tmp_path / SETTINGS_NAME).write_text(json.dumps(SETTINGS))
    (tmp_path / TSV_NAME).write_text("idx\tlabel\tpredict\tradius\tcorrect\n0\t1\t1\t0.5\t1\n")
    with pytest.raises(ValueError, match="header mismatch: expected"):
        CertifyLog(tmp_path, SETTINGS)
    with pytest.raises(ValueError, match="header mismatch: expected"):
        read_tsv(tmp_path / TSV_NAME)


def test_tsv_without_settings_is_refused(tmp_path):
    with CertifyLog(tmp_path, SETTINGS) as log:
        log.append(rows(0, 1))
    (tmp_path / SETTINGS_NAME).unlink()
    with pytest.raises(ValueError, match=r"certify.tsv exists but .*settings.json does not, so the settings"):
        CertifyLog(tmp_path, SETTINGS)


def test_second_writer_is_locked_out(tmp_path):
    log = CertifyLog(tmp_path, SETTINGS)
    try:
        with pytest.raises(RuntimeError, match="is in use by another process"):
            CertifyLog(tmp_path, SETTINGS)
    finally:
        log.close()
    with CertifyLog(tmp_path, SETTINGS) as again:  # released on close
        assert again.done == set()


OPEN_LOG = textwrap.dedent(
    """
    import json, sys
    if sys.argv[3] == "no-fcntl":
        sys.modules["fcntl"] = None  # as on a platform without fcntl: import fcntl fails
    from lightning_idrs.tsv_log import CertifyLog
    settings = json.loads(sys.argv[2])
    try:
        log = CertifyLog(sys.argv[1], settings)
    except RuntimeError as error:
        print("refused:", error)
    else:
        with log:
            if sys.argv[3] == "no-fcntl":  # the lock holds within this process too
                try:
                    CertifyLog(sys.argv[1], settings)
                except RuntimeError as error:
                    print("second refused:", error)
            log.append([(7, 1, 1, 0.5, 1, 0.25, 0.9, 0.1, 1000)])
        print("wrote")
    """
)


def _open_log_in_subprocess(out, mode):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", OPEN_LOG, str(out), json.dumps(SETTINGS), mode],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_another_process_is_locked_out_until_the_holder_closes(tmp_path):
    with CertifyLog(tmp_path, SETTINGS):
        out = _open_log_in_subprocess(tmp_path, "plain")
        assert out.strip() == f"refused: the certification output directory {tmp_path} is in use by another process"
        assert read_tsv(tmp_path / TSV_NAME)["idx"].tolist() == []  # the refused process wrote nothing
    assert _open_log_in_subprocess(tmp_path, "plain").strip() == "wrote"
    assert read_tsv(tmp_path / TSV_NAME)["idx"].tolist() == [7]


def test_locking_works_without_fcntl(tmp_path):
    # filelock picks another mechanism where fcntl does not exist: still one writer at a time
    out = _open_log_in_subprocess(tmp_path, "no-fcntl").splitlines()
    assert out == [f"second refused: the certification output directory {tmp_path} is in use by another process",
                   "wrote"]
    assert read_tsv(tmp_path / TSV_NAME)["idx"].tolist() == [7]
    with CertifyLog(tmp_path, SETTINGS) as again:  # and it was released
        assert again.done == {7}


# ------------------------------------------------------------------------------------------
# a real kill -9
# ------------------------------------------------------------------------------------------
BATCHES = (1, 7, 60, 400)  # rows per append: small and large ones (400 rows are a 30 KB write)
WRITER = ROW_SOURCE + f"BATCHES = {BATCHES!r}\n" + textwrap.dedent(
    """
    import json, os, signal, sys
    import lightning_idrs.tsv_log as results
    out, stop, settings = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    kill_after, tear = int(sys.argv[4]), int(sys.argv[5])
    log = results.CertifyLog(out, settings)
    i = max(log.done) + 1 if log.done else 0
    k = 0
    if tear:
        # Freeze the process in the middle of a write, as a kill during the syscall would: the
        # batch after `tear` more batches writes only part of its bytes, says so, and blocks
        # (reading stdin) until the test kills it.
        write_all, calls = results._write_all, [0]
        def torn_write(fd, data):
            calls[0] += 1
            if calls[0] <= tear:
                return write_all(fd, data)
            os.write(fd, data[: len(data) // 2 + 3])
            print("torn", flush=True)
            sys.stdin.read()
            os._exit(1)  # stdin closed without a kill: the test is gone
        results._write_all = torn_write
    while i < stop:
        size = BATCHES[k % len(BATCHES)]
        log.append([expected_row(j) for j in range(i, min(i + size, stop))])
        i, k = min(i + size, stop), k + 1
        if k == kill_after:  # a real kill -9 of the writing process, with its file open and locked
            os.kill(os.getpid(), signal.SIGKILL)
    log.close()
    """
)


def _rows_after(previous: int, kill_after: int, tear: int) -> int:
    """The rows on disk once a writer that resumed after row ``previous`` is killed: those of its first
    ``kill_after`` batches, or those of its first ``tear`` batches and the whole lines of the torn one."""
    start = previous + sum(BATCHES[k % len(BATCHES)] for k in range(kill_after or tear))
    if not tear:
        return start
    data = "".join(format_row(row) for row in rows(start, start + BATCHES[tear % len(BATCHES)])).encode()
    return start + data[: len(data) // 2 + 3].count(b"\n")  # the bytes the writer's torn write kept


def _check_prefix(out_dir):
    """Reopen the directory: every row parses, no duplicates, rows are exactly expected_row(0..k-1)."""
    with CertifyLog(out_dir, SETTINGS) as log:
        got = [tuple(r) for r in log.rows]
        repaired = log.repaired
    assert got == rows(0, len(got))
    lines = file_lines(Path(out_dir) / TSV_NAME)  # after the repair the file ends on a complete line
    assert lines[0] == "\t".join(TSV_HEADER) and len(lines) == len(got) + 1
    return len(got), repaired


def test_kill_9_loses_no_row_and_leaves_no_torn_or_duplicate_row(tmp_path):
    out = tmp_path / "out"
    stop = 6000
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    writer = [sys.executable, "-c", WRITER, str(out), str(stop), json.dumps(SETTINGS)]
    tsv = out / TSV_NAME
    previous = 0
    # (batches after which the writer SIGKILLs itself, or 0; batches before a torn write, or 0): kills between
    # two appends after small and large batches, and one while a write is half done
    for kill_after, tear in ((3, 0), (9, 0), (0, 6), (14, 0)):
        proc = subprocess.Popen(writer + [str(kill_after), str(tear)], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if tear:
            assert proc.stdout.readline() == b"torn\n", proc.stderr.read().decode()[-2000:]
            with open(tsv, "rb") as fh:
                assert not fh.read().endswith(b"\n")  # the file really holds a torn line now
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
        stderr = proc.stderr.read().decode()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
        assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
        done, repaired = _check_prefix(out)
        assert done == _rows_after(previous, kill_after, tear), "rows on disk before the kill were lost or doubled"
        assert (repaired is not None) == bool(tear)  # only the torn write leaves a partial line to drop
        previous = done
    assert previous < stop
    # the last run resumes and completes: every point exactly once, in order
    subprocess.run(writer + ["0", "0"], env=env, check=True, timeout=120)
    assert _check_prefix(out)[0] == stop
    assert read_tsv(tsv)["idx"].tolist() == list(range(stop))


# ------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------
def test_write_summary_is_plain_json_and_atomic(tmp_path):
    path = tmp_path / "summary.json"
    summary = {"dim": np.int64(3072), "acr": np.float64(0.5), "curve": np.array([1.0, 0.5]),
               "bad": float("nan"), "certified_accuracy": {0.25: 0.5}}
    write_summary(path, summary)
    text = path.read_text()
    assert "NaN" not in text
    got = read_summary(path)
    assert got == {"dim": 3072, "acr": 0.5, "curve": [1.0, 0.5], "bad": None, "certified_accuracy": {"0.25": 0.5}}
    # a failing write leaves the previous file intact and no temporary file behind
    with pytest.raises(TypeError):
        write_summary(path, {"acr": 1.0, "oops": object()})
    assert read_summary(path) == got
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_log_summarize_matches_columns(tmp_path):
    with CertifyLog(tmp_path, SETTINGS) as log:
        log.append(rows(0, 50))
        s = log.summarize([0.0, 1.0, 2.0], num_classes=10)
    r = np.array([row[3] for row in rows(0, 50)])
    c = np.array([row[4] for row in rows(0, 50)])
    assert s["num_points"] == 50
    assert s["certified_accuracy"]["1"] == pytest.approx(np.mean((c == 1) & (r >= 1.0)))
    assert s["abstain_rate"] == pytest.approx(10 / 50)  # j % 5 == 0 abstains


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_single_and_overlay(tmp_path):
    radii = np.linspace(0, 1, 11)
    one = plot_curves({"RS": (radii, 0.8 - 0.5 * radii)}, tmp_path / "a" / "one.png", title="RS")
    two = plot_curves({"RS": (radii, 0.8 - 0.5 * radii), "IDRS": (radii, 0.7 - 0.3 * radii)}, tmp_path / "two.png")
    for p in (one, two):
        assert p.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    a, b = imread(str(one)), imread(str(two))
    assert a.shape == b.shape and not np.array_equal(a, b)  # the overlay drew something more
    with pytest.raises(ValueError, match="no curves to plot"):
        plot_curves({}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="radii and accuracy must be 1-D of equal length"):
        plot_curves({"x": ([0, 1], [1.0])}, tmp_path / "bad.png")


def test_curve_from_tsv_and_automatic_grid(tmp_path):
    with CertifyLog(tmp_path / "rs", SETTINGS) as log:
        log.append(rows(0, 40))
    columns = read_tsv(tmp_path / "rs" / TSV_NAME)
    grid = [0.0, 0.5, 1.0, 3.0]
    r = np.array([row[3] for row in rows(0, 40)])
    c = np.array([row[4] for row in rows(0, 40)])
    np.testing.assert_allclose(curve_from_tsv_columns(columns, grid), certified_accuracy(r, c, grid))
    auto = radius_grid(ReportOptions(radii_step=0.5), columns["radius"])  # covers the largest radius
    assert r.max() < auto[-1] <= r.max() + 1.0 and np.allclose(np.diff(auto), 0.5)
    assert curve_from_tsv_columns(columns, auto)[-1] == 0.0
    assert radius_grid(ReportOptions(radii_step=0.25, radii_max=1.0)).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert report_radii(ReportOptions(radii=[1.0, 0.5, 0.5])).tolist() == [0.5, 1.0]  # the report grid
    assert report_radii(ReportOptions(), default=(0.25, 0.0)).tolist() == [0.0, 0.25]  # else the data set's
    grid = radius_grid(ReportOptions(radii_step=0.25, radii_max=1.0), report=[0.1, 0.5, 3.0])
    assert grid.tolist() == [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 3.0], "the curve's grid holds the report grid"
    assert decision_grid(ReportOptions(radii=[0.5, 0.25], radii_step=0.1)).tolist() == [0.25, 0.5]
    with pytest.raises(ValueError, match="radii_step must be a finite number > 0, got 0"):
        ReportOptions(radii_step=0)
    with pytest.raises(ValueError, match="over 10,000 points"):
        ReportOptions(radii_step=1e-6, radii_max=1.0)
