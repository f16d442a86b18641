"""``python -m lightning_idrs predict`` (Cohen et al.'s PREDICT with abstention, on a split or on files) and
``python -m lightning_idrs table`` (a results table of certify folders, Markdown and LaTeX, best in bold)."""
import csv
import json
import re

import numpy as np
import pytest
import torch

import lightning_idrs
from lightning_idrs.checkpoint import load_checkpoint
from lightning_idrs.commands import main
from lightning_idrs.smoothing import PointNoise, SmoothedClassifier


def read(path) -> list:
    return list(csv.DictReader(open(path), delimiter="\t"))


# ------------------------------------------------------------------------------ predict
def test_predict_on_a_split_is_cohens_predict_with_its_noise_per_point(checkpoint, tmp_path, capsys):
    out = tmp_path / "p.tsv"
    args = ["predict", "--ckpt_path", str(checkpoint), "--predict.n", "300", "--predict.skip", "2",
            "--predict.max", "6", "--predict.batch_size", "256", "--predict.out", str(out)]
    assert main(args) == 0
    assert re.match(r"predicted 6 input\(s\): abstained on \d, smoothed accuracy [0-9.]+; wrote ", capsys.readouterr().out)
    rows = read(out)
    assert list(rows[0]) == ["idx", "label", "predict", "correct", "sigma"] and [int(r["idx"]) for r in rows] == [
        0, 2, 4, 6, 8, 10]
    loaded = load_checkpoint(checkpoint)  # the same PREDICT by hand: same noise (seed, idx), same answers
    dataset = loaded.datamodule.split_dataset("test")
    x = torch.stack([dataset[i][0] for i in range(0, 12, 2)])
    smoothed = SmoothedClassifier(loaded.model.model, loaded.model.sigma, 10)
    expected = smoothed.predict(x, 300, 0.001, 77, PointNoise(0, np.arange(0, 12, 2)))
    assert [int(r["predict"]) for r in rows] == expected.tolist()
    assert all(int(r["correct"]) == (int(r["predict"]) == int(r["label"])) for r in rows)
    assert sum(int(r["correct"]) for r in rows) >= 4, "a trained model is right on most points"
    few = lightning_idrs.predict(checkpoint, n=10, max=3, out=str(tmp_path / "few.tsv"))  # 10 samples never decide
    assert few["predict"].tolist() == [-1, -1, -1] and few["correct"].tolist() == [0, 0, 0]


def test_predict_on_image_and_array_files(checkpoint, tmp_path):
    from PIL import Image

    loaded = load_checkpoint(checkpoint)
    images = torch.stack([loaded.datamodule.split_dataset("test")[i][0] for i in range(3)]).numpy()
    np.save(tmp_path / "batch.npy", images)  # [3, 1, 8, 8] floats in [0, 1]
    np.save(tmp_path / "one.npy", images[0, 0])  # [8, 8]
    Image.fromarray(np.round(images[1, 0] * 255).astype(np.uint8)).save(tmp_path / "digit.png")
    out = tmp_path / "files.tsv"
    assert main(["predict", "--ckpt_path", str(checkpoint), str(tmp_path / "batch.npy"), str(tmp_path / "one.npy"),
                 str(tmp_path / "digit.png"), "--predict.n", "200", "--predict.out", str(out)]) == 0
    rows = read(out)
    assert list(rows[0]) == ["file", "index", "predict", "sigma"]
    assert [(r["file"].rsplit("/", 1)[1], int(r["index"])) for r in rows] == [
        ("batch.npy", 0), ("batch.npy", 1), ("batch.npy", 2), ("one.npy", 0), ("digit.png", 0)]
    assert all(-1 <= int(r["predict"]) <= 9 and float(r["sigma"]) > 0 for r in rows)
    assert rows[0]["sigma"] == rows[3]["sigma"], "the same image, the same sigma(x)"


@pytest.mark.parametrize("make, line", [
    (lambda d: d / "missing.npy", "input {path}: No such file or directory"),
    (lambda d: (np.save(d / "big.npy", np.zeros((2, 1, 28, 28))), d / "big.npy")[1],
     "input {path}: has shape (2, 1, 28, 28); the model takes images [1, 8, 8] (or a batch [B, 1, 8, 8])"),
    (lambda d: (np.save(d / "nan.npy", np.full((8, 8), np.nan)), d / "nan.npy")[1], "input {path}: holds NaN or inf pixels"),
    (lambda d: (np.save(d / "far.npy", np.full((8, 8), 3.0)), d / "far.npy")[1],
     "input {path}: pixels must be in [0, 1] (as the model was trained), found [3, 3]"),
    (lambda d: ((d / "fake.png").write_text("no image"), d / "fake.png")[1], "input {path}: is not a readable image"),
    (lambda d: ((d / "notes.txt").write_text("x"), d / "notes.txt")[1],
     "input {path}: is neither an image (.png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp) nor a NumPy .npy array"),
])
def test_predict_refuses_bad_files_with_one_line_and_writes_nothing(checkpoint, tmp_path, capsys, make, line):
    path = make(tmp_path)
    out = tmp_path / "never.tsv"
    assert main(["predict", "--ckpt_path", str(checkpoint), str(path), "--predict.out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: " + line.format(path=path) and not out.exists()


def test_predict_refuses_bad_options_and_documents_itself(checkpoint, tmp_path, capsys):
    assert main(["predict", "--ckpt_path", str(checkpoint), "--predict.n", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --predict.n must be an integer >= 1, got 0"
    assert main(["predict", "--ckpt_path", str(checkpoint), "--predict.seed", str(2**32)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --predict.seed must be an integer from 0 to 4294967295 (2^32 - 1), got {2**32}"
    assert main(["predict"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --ckpt_path is required")
    assert main(["predict", "--help"]) == 0
    assert "abstain" in capsys.readouterr().out and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ table
@pytest.fixture(scope="module")
def folders(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    for name, seed in (("a_run", 0), ("b&run", 1)):
        lightning_idrs.certify(checkpoint, root / name, n0=10, n=150, max=10, seed=seed,
                               wandb=lightning_idrs.certification.WandbOptions(mode="disabled"))
    return root / "a_run", root / "b&run"


def _numbers(row: str) -> list:
    """The ACR and accuracy cells of a Markdown row."""
    return [float(cell.strip("* ")) for cell in row.strip("| ").split(" | ")[3:]]


def test_table_in_markdown_and_latex_with_the_best_value_of_each_column_in_bold(folders, tmp_path, capsys):
    assert main(["table", *map(str, folders)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | n | points | ACR | R=0 | R=0.25 | R=0.5 | R=0.75 | R=1 | R=1.25 | R=1.5 |"
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in folders]
    rows = lines[2:]
    assert len(rows) == 2 and all(row.startswith("| digits-IDRS-sb0.25-r0.2 (") for row in rows)
    for row, summary in zip(rows, summaries):  # the values are the summary's
        assert _numbers(row)[0] == pytest.approx(summary["acr"], abs=5e-4)
        assert _numbers(row)[1:] == pytest.approx([summary["certified_accuracy"][k]
                                                   for k in ("0", "0.25", "0.5", "0.75", "1", "1.25", "1.5")], abs=5e-4)
    cells = [row.split(" | ")[3:] for row in rows]
    for a, b in zip(*cells):  # bold: the larger value, both on a tie
        va, vb = (float(c.strip(" |*")) for c in (a, b))
        assert (a.startswith("**"), b.startswith("**")) == (va >= vb, vb >= va), (a, b)
    out = tmp_path / "table.tex"
    assert main(["table", *map(str, folders), "--format", "latex", "--radii", "0,0.5", "--out", str(out)]) == 0
    latex = capsys.readouterr().out
    assert latex == out.read_text() and latex.startswith("\\begin{tabular}{lrrrrr}\n\\hline\n")
    assert "run & $n$ & points & ACR & $R=0$ & $R=0.5$ \\\\" in latex and "\\textbf{" in latex
    assert "(b\\&run)" in latex, "a folder's name escaped for LaTeX"


def test_table_refuses_what_is_no_certify_folder(folders, tmp_path, capsys):
    assert main(["table", str(folders[0]), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path} is not a finished certify folder (No such file or directory)")
    assert main(["table", str(folders[0]), "--format", "html"]) == 2
    assert capsys.readouterr().err.strip() == "error: --format must be one of markdown, latex, got html"
