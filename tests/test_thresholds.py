"""``python -m lightning_idrs thresholds`` prints the curse-of-dimensionality table."""
import re

import pytest

from lightning_idrs.commands import main
from tests.helpers import PAPER_TABLE


def test_prints_the_papers_table(capsys):
    assert main(["thresholds"]) == 0
    out = capsys.readouterr().out
    for dim, row in PAPER_TABLE.items():
        line = next(l for l in out.splitlines() if f"({dim})" in l)
        lower = [float(x) for x in re.findall(r"(\d\.\d{3}) /", line)]
        assert lower == pytest.approx(row, abs=1.5e-3)  # printed with 3 decimals


def test_custom_dimensions_and_bad_p_b(capsys):
    assert main(["thresholds", "--dim", "64", "--p-b", "0.1"]) == 0
    assert "N=64 (64)" in capsys.readouterr().out
    assert main(["thresholds", "--p-b", "1.5"]) == 2
    assert capsys.readouterr().err == "error: p_b must lie in [0, 1], got values in [1.5, 1.5]\n"
    assert main(["thresholds", "--dim", "x"]) == 2
    assert capsys.readouterr().err == "error: argument --dim: invalid int value: 'x'\n"


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {command} " in out for command in ("fit", "validate", "test", "certify", "predict", "table",
                                                      "thresholds", "dashboard", "doctor"))
    assert main([]) == 2  # no command: usage on stderr, failure exit code
    assert "usage" in capsys.readouterr().err
    assert main(["fitt"]) == 2  # an unknown command lists them all
    err = capsys.readouterr().err
    assert "  certify " in err and "  thresholds " in err
    assert err.strip().splitlines()[-1] == ("error: unknown command 'fitt'; choose one of fit, validate, test, "
                                            "certify, predict, table, thresholds, dashboard, doctor")


def test_plot_writes_the_papers_figures(tmp_path, capsys):
    assert main(["thresholds", "--plot", str(tmp_path / "figures")]) == 0
    folder = tmp_path / "figures"
    for name in ("thresholds.png", "worst_case.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (folder / "thresholds.md").read_text()
    for dim, row in PAPER_TABLE.items():
        line = next(l for l in table.splitlines() if f"({dim})" in l)
        lower = [float(x) for x in re.findall(r"(\d\.\d{3}) /", line)]
        assert lower == pytest.approx(row, abs=1.5e-3)
    curves = (folder / "worst_case.md").read_text()
    first = next(l for l in curves.splitlines() if l.startswith("| 0.250 |"))
    values = [float(v) for v in first.strip("|").split("|")[1:]]
    assert values[3] < 0.5 < min(values[0], values[-1])  # sigma1 = sigma0 certifies at 0.25; 4% off does not
    (tmp_path / "afile").write_text("x")
    assert main(["thresholds", "--plot", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err.startswith("error: --plot ")


def test_p_b_is_spelled_like_every_other_flag_and_tiny_values_stay_finite(capsys):
    import warnings

    assert main(["thresholds", "--dim", "64", "--p_b", "0.1"]) == 0
    assert "N=64 (64)" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from the root finder
        assert main(["thresholds", "--dim", "1", "10", "3072", "--p_b", "1e-300", "0.1"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "nan" not in captured.out
    line = next(l for l in captured.out.splitlines() if "(10)" in l)
    lower, upper = (float(v) for v in re.findall(r"(\d+\.\d{3}) / (\d+\.\d{3})", line)[0])
    assert lower == 0.0 and 12 < upper < 13  # the lower threshold underflows to 0 (it is below 2e-7)
