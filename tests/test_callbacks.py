"""The validation-end certification callback."""
import csv
import json

import numpy as np
import pytest
import torch

from lightning_idrs.callbacks import CertificationCallback, stratified_subset
from lightning_idrs.commands.fit import cli_main

FAST = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]
CALLBACK = ["--trainer.callbacks+=lightning_idrs.callbacks.CertificationCallback",
            "--trainer.callbacks.every_n_epochs=1", "--trainer.callbacks.num_points=40",
            "--trainer.callbacks.n=64", "--trainer.callbacks.radii=[0.0,0.1,0.2,0.3]"]


def test_stratified_subset_is_balanced_and_fixed():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    chosen = stratified_subset(labels, 21, seed=3)
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert counts == [8, 8, 5]  # every class as far as it goes, the rest shared out evenly
    assert torch.equal(chosen, stratified_subset(labels, 21, seed=3))
    assert not torch.equal(chosen, stratified_subset(labels, 21, seed=4))
    assert len(set(chosen.tolist())) == 21


@pytest.mark.slow
def test_logs_certified_accuracy_with_a_csv_logger(tmp_path):
    cli = cli_main(["fit", *FAST, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "CSVLogger",
                    "--trainer.logger.save_dir", str(tmp_path), "--trainer.callbacks=[]", *CALLBACK])
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("monitor/acr")]
    assert len(logged) == 2, "one certification per epoch (every_n_epochs=1)"
    assert [float(r["epoch"]) for r in logged] == [0, 1]
    assert all(r.get("val/noisy_acc") for r in logged), "the Callback's scalars are in the validation row"
    assert not any(k.startswith("certify/") for k in rows[0]), "monitoring keys are not the reported certify/ keys"
    last = {k: float(v) for k, v in logged[-1].items() if v and k.startswith("monitor/")}
    curve = [last[f"monitor/acc_R{r:g}".replace(".", "p")] for r in (0.0, 0.1, 0.2, 0.3)]
    assert all(a >= b for a, b in zip(curve, curve[1:])) and 0 <= curve[-1] <= curve[0] <= 1
    assert curve[0] > 0.5, "a trained smoothed classifier certifies most points at radius 0"
    assert last["monitor/num_points"] == 40 and 0 <= last["monitor/abstain_rate"] <= 1
    assert last["monitor/mean_sigma"] > 0 and last["monitor/acr"] > 0
    assert not any("class_" in k and "worst" not in k and "gap" not in k for k in last), "no per-class keys"
    assert {k.rsplit("_R", 1)[1] for k in last if "_R" in k} == {"0", "0p1", "0p2", "0p3"}, "the report grid only"
    for r in ("0", "0p1", "0p2", "0p3"):  # fairness: the worst class is at most the mean, the gap within [0, 1]
        assert 0 <= last[f"monitor/worst_class_acc_R{r}"] <= last[f"monitor/acc_R{r}"] + 1e-9
        assert 0 <= last[f"monitor/class_gap_R{r}"] <= 1
    # the curve as a PNG inside the run directory
    pngs = list((tmp_path).rglob("certified_accuracy_epoch*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert sum(isinstance(c, CertificationCallback) for c in cli.trainer.callbacks) == 1  # attached once


@pytest.mark.slow
def test_wandb_offline_run_holds_the_certified_accuracy_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cli = cli_main(["fit", *FAST, "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks=[]", *CALLBACK])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert cli.trainer.logger.experiment.settings.run_id == runs[0].name.rsplit("-", 1)[1]
    tables = sorted(runs[0].rglob("curve_table_*.table.json"), key=lambda p: int(p.name.split("_")[2]))
    assert len(tables) == 2, "the certified-accuracy wandb.Table must be in the offline run, once per certification"
    table = json.loads(tables[-1].read_text())  # the last one holds every epoch's curve
    assert table["columns"] == ["epoch", "radius", "certified_accuracy", "split", "n", "num_points", "line"]
    grid = sorted({0.0, 0.1, 0.2, 0.3} | {k * 0.125 for k in range(9)})  # the report grid in the curve's grid
    assert [row[0] for row in table["data"]] == [0] * len(grid) + [1] * len(grid)
    for epoch in (0, 1):
        rows = [row for row in table["data"] if row[0] == epoch]
        assert [row[1] for row in rows] == grid and {(r[3], r[4], r[5]) for r in rows} == {("val", 64, 40)}
        accuracy = np.array([row[2] for row in rows])
        assert np.all((accuracy >= 0) & (accuracy <= 1)) and np.all(np.diff(accuracy) <= 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=1.5), r"^alpha must be a number in \(0, 1\), got 1\.5$"),
    (dict(n=0), "^n must be an integer >= 1, got 0$"),
    (dict(n0=2.5), r"^n0 must be an integer >= 1, got 2\.5$"),
    (dict(num_points=0), "^num_points must be an integer >= 1, got 0$"),
    (dict(every_n_epochs=0), "^every_n_epochs must be an integer >= 1, got 0$"),
    (dict(radii=[]), r"^radii must hold at least one radius \(or be null\)$"),
    (dict(radii=[0.5, -1.0]), r"^radii must be a finite number >= 0, got -1\.0$"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CertificationCallback(**kwargs)
