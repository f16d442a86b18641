"""The validation-end certification callback."""
import csv
import json

import numpy as np
import pytest
import torch

from lightning_idrs.callbacks import CertificationCallback, stratified_subset
from lightning_idrs.commands.trainer import cli_main

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


def test_logs_certified_accuracy_with_a_csv_logger(tmp_path):
    cli = cli_main(["fit", *FAST, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "CSVLogger",
                    "--trainer.logger.save_dir", str(tmp_path), "--trainer.callbacks=[]", *CALLBACK])
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("certify/acr")]
    assert len(logged) == 2, "one certification per epoch (every_n_epochs=1)"
    last = {k: float(v) for k, v in logged[-1].items() if v and k.startswith("certify/")}
    curve = [last[f"certify/acc@{r:g}"] for r in (0.0, 0.1, 0.2, 0.3)]
    assert all(a >= b for a, b in zip(curve, curve[1:])) and 0 <= curve[-1] <= curve[0] <= 1
    assert curve[0] > 0.5, "a trained smoothed classifier certifies most points at radius 0"
    assert last["certify/num_points"] == 40 and 0 <= last["certify/abstain_rate"] <= 1
    assert last["certify/mean_sigma"] > 0 and last["certify/acr"] > 0
    classes = {k.split("/")[1] for k in last if k.startswith("certify/class_")}
    assert classes == {f"class_{c}" for c in range(10)}
    # the curve as a PNG inside the run directory
    pngs = list((tmp_path).rglob("certified_accuracy_epoch*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert cli.trainer.callbacks  # the run finished with the callback attached


def test_wandb_offline_run_holds_the_certified_accuracy_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cli = cli_main(["fit", *FAST, "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks=[]", *CALLBACK])
    cli.trainer.logger.experiment.finish()  # Lightning leaves the run open in this process
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].rglob("*.table.json"))
    assert tables, "the certified-accuracy wandb.Table must be in the offline run"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["radius", "certified_accuracy"]
    radii = [row[0] for row in table["data"]]
    assert radii == [0.0, 0.1, 0.2, 0.3]
    accuracy = np.array([row[1] for row in table["data"]])
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
