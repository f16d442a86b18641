"""What a user finds in W&B, read as W&B reads it: the offline ``.wandb`` files of a short fit (two Callback
certifications), of a certify run (and its rerun), and of ``test``, decoded with W&B's own protobufs."""
import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from lightning_idrs.commands import main
from lightning_idrs.commands.fit import cli_main
from lightning_idrs.tsv_log import TSV_NAME, read_tsv
from lightning_idrs.wandb_logging import sigma_kind
from tests.helpers import finished_run_records

CALLBACKS = {"trainer": {"callbacks": [
    {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
     "init_args": {"monitor": "val/noisy_acc", "mode": "max", "filename": "best-{epoch:02d}"}},
    {"class_path": "lightning_idrs.callbacks.CertificationCallback",
     "init_args": {"every_n_epochs": 1, "num_points": 30, "n0": 8, "n": 48, "radii": [0.0, 0.2, 0.4]}}]}}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# ------------------------------------------------------------------------------ reading .wandb files
def _items(items) -> dict:
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}


def _nested(items, out=None) -> dict:
    """Config updates into ``out``; a nested key (``_wandb`` / ``visualize`` / chart) sets one leaf."""
    out = {} if out is None else out
    for i in items:
        *parents, last = list(i.nested_key) or [i.key]
        place = out
        for key in parents:
            place = place.setdefault(key, {})
        place[last] = json.loads(i.value_json)
    return out


class Run:
    """One offline run folder, as records by kind."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.records = self._read()
        self.run = next(r.run for r in self.records if r.WhichOneof("record_type") == "run")
        self.config, self.summary, self.history, self.metrics, self.artifacts = {}, {}, [], [], []
        for record in self.records:
            kind = record.WhichOneof("record_type")
            if kind == "config":
                _nested(record.config.update, self.config)
            elif kind == "summary":
                self.summary.update(_items(record.summary.update))
            elif kind == "history":
                self.history.append(_items(record.history.item))
            elif kind == "metric":
                self.metrics.append(record.metric)
            elif kind == "artifact":
                self.artifacts.append(record.artifact)
        self.config = {**_nested(self.run.config.update), **self.config}

    def _read(self) -> list:
        return finished_run_records(self.folder)

    def logged(self, key):
        return [step for step in self.history if any(k == key or k.startswith(key + "/") for k in step)]

    def table(self, step: dict, key: str) -> dict:
        return json.loads((self.folder / "files" / step[f"{key}/path"]).read_text())


def runs(folder) -> list:
    return [Run(path) for path in sorted(Path(folder).glob("wandb/offline-run-*"))]


# ------------------------------------------------------------------------------ one fit, one certify, shared
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb_fit")
    config = root / "callbacks.yaml"
    config.write_text(yaml.safe_dump(CALLBACKS))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_SILENT", "true")
        cli = cli_main(["fit", "--config", str(config), "--trainer.max_epochs", "2", *QUIET,
                        "--trainer.default_root_dir", str(root / "run")])
    (fit,) = runs(root / "run")
    return root, cli.trainer.checkpoint_callback.best_model_path, fit


@pytest.mark.slow
def test_every_fit_in_one_process_gets_a_finished_run_of_its_own(tmp_path):
    """Lightning leaves a W&B run open for the rest of the process, and its WandbLogger reuses an open run:
    the command finishes its own, so a second fit in one process (a notebook, a sweep calling ``main``) logs
    into a run and folder of its own; a fit that fails finishes its run with exit code 1."""
    def fit(name, *extra):
        return main(["fit", "--trainer.default_root_dir", str(tmp_path / name), "--trainer.max_epochs", "1",
                     "--trainer.limit_train_batches", "3", *QUIET, *extra])

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
        patch.setenv("WANDB_SILENT", "true")
        assert fit("first") == 0 and fit("second") == 0
        assert fit("diverged", "--model.optimizer.init_args.lr", "1e12") == 2
    folders = [runs(tmp_path / name) for name in ("first", "second", "diverged")]
    assert [len(found) for found in folders] == [1, 1, 1]
    first, second, diverged = (found[0] for found in folders)
    assert len({first.run.run_id, second.run.run_id, diverged.run.run_id}) == 3
    exits = [next(r.exit for r in run.records if r.WhichOneof("record_type") == "exit")
             for run in (first, second, diverged)]
    assert [e.exit_code for e in exits] == [0, 0, 1]


def _certify(checkpoint, out, *extra):
    return main(["certify", "--ckpt_path", str(checkpoint), "--certify.n0", "8", "--certify.n", "64",
                 "--certify.radii", "0,0.2,0.4", "--certify.out", str(out), *extra])


@pytest.fixture(scope="module")
def certified(trained):
    """A certify run of 12 points, then a rerun into the same folder extending it to 15, with a compare curve."""
    root, checkpoint, _ = trained
    out, said = root / "certify", io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_SILENT", "true")
        assert _certify(checkpoint, out, "--certify.max", "12") == 0
        (first,) = runs(out)
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            assert _certify(checkpoint, out, "--certify.max", "15", "--certify.compare", str(out / TSV_NAME)) == 0
    return out, first, runs(out), said.getvalue()


@pytest.mark.slow
def test_fit_logs_the_whole_nested_config_and_keeps_results_out_of_it(trained):
    _, _, fit = trained
    config = fit.config
    assert config["trainer"]["max_epochs"] == 2 and config["seed_everything"] == 0
    assert config["model"]["optimizer"]["init_args"]["lr"] == 0.002
    assert config["model"]["sigma"]["class_path"] == "lightning_idrs.sigma.KnnSigma"
    assert config["model"]["sigma"]["init_args"]["semi_elasticity"] == 0.2
    assert config["data"]["class_path"] == "lightning_idrs.data.DigitsDataModule"
    callback = config["trainer"]["callbacks"][-1]
    assert callback["class_path"].endswith("CertificationCallback") and callback["init_args"]["n"] == 48
    assert not any("acr" in key or "acc" in key for key in config if not key.startswith("_wandb"))
    assert fit.run.job_type == "fit" and list(fit.run.tags) == ["digits", "IDRS"]
    assert fit.run.run_group == f"digits-IDRS-{fit.run.run_id}"


def test_fit_puts_the_callback_on_the_epoch_axis_and_training_on_the_step(trained):
    _, _, fit = trained
    axes = {m.glob_name or m.name: m.step_metric for m in fit.metrics}
    assert "epoch" in axes and axes["monitor/*"] == "epoch" and axes["train/*"] == "trainer/global_step"
    certifications = fit.logged("monitor/acr")
    assert [step["epoch"] for step in certifications] == [0, 1]
    for step in certifications:  # a certification's scalars, tables, histogram and plot at one step
        for key in ("monitor/curve_table", "monitor/class_table", "monitor/sigma", "monitor/plot",
                    "monitor/worst_class_acc@0.2", "monitor/class_gap@0.2", "monitor/clean_accuracy"):
            assert fit.logged(key) and any(k.startswith(key) for k in step), key
    keys = {k for step in fit.history for k in step}
    assert not any(k.startswith("certify/") for k in keys), "monitoring keys are not the reported ones"
    assert not any(k.split("/")[1].startswith("class_") and k.split("/")[1][6:7].isdigit() for k in keys
                   if k.startswith("monitor/")), "no per-class scalar keys"


def test_fit_curve_table_grows_with_an_epoch_column_and_charts_one_line_per_epoch(trained):
    _, _, fit = trained
    last = fit.logged("monitor/curve_table")[-1]
    table = fit.table(last, "monitor/curve_table")
    assert table["columns"] == ["epoch", "radius", "certified_accuracy", "split", "n", "num_points"]
    assert [row[:2] for row in table["data"]] == [[e, r] for e in (0, 1) for r in (0.0, 0.2, 0.4)]
    assert {tuple(row[3:]) for row in table["data"]} == {("val", 48, 30)}
    charts = fit.config["_wandb"]["visualize"]
    assert charts["monitor/curve"]["panel_config"]["fieldSettings"] == {"x": "radius", "y": "certified_accuracy",
                                                                        "stroke": "epoch"}
    assert charts["monitor/class"]["panel_config"]["fieldSettings"]["stroke"] == "class"
    classes = fit.table(last, "monitor/class_table")
    assert classes["columns"] == ["epoch", "class", "radius", "certified_accuracy", "points"]
    assert {row[1] for row in classes["data"]} == set(range(10)) and sum(r[4] for r in classes["data"]) == 3 * 30
    worst = min(row[3] for row in classes["data"] if row[2] == 0.2)
    assert fit.summary["monitor/worst_class_acc@0.2"] == pytest.approx(worst)


def test_fit_logs_its_checkpoints_as_a_model_artifact_staged_offline(trained):
    root, checkpoint, fit = trained
    models = [a for a in fit.artifacts if a.type == "model"]
    assert models and all(a.name == f"model-{fit.run.run_id}" for a in models)
    staged = [Path(c.local_path) for a in models for c in a.manifest.contents]
    assert all(path.is_file() and root in path.parents for path in staged), "staged under the run folder"


def test_certify_run_config_summary_points_tags_and_lineage(trained, certified):
    _, checkpoint, fit = trained
    out, run, again, _ = certified
    assert run.run.job_type == "certify" and list(run.run.tags) == ["digits", "IDRS"]
    assert run.run.run_group == fit.run.run_group, "the certify run joins its checkpoint's fit run"
    assert run.config["sigma"]["class_path"] == "lightning_idrs.sigma.KnnSigma"
    assert run.config["certify"]["n"] == 64 and run.config["checkpoint"]["config"]["model"]["arch"] == "small_cnn"
    trained_with = run.config["checkpoint"]["fit_config"]  # the fit run's whole config, read from the checkpoint
    assert trained_with["trainer"]["max_epochs"] == 2
    assert all(trained_with[k] == fit.config[k] for k in ("trainer", "model", "data", "seed_everything"))
    assert run.config["checkpoint"]["fit_run"] == fit.run.run_id and run.config["checkpoint"]["epoch"] == 1
    assert "acr" not in run.config and "clean_accuracy" not in run.config
    summary = json.loads((out / "summary.json").read_text())  # after the rerun: 15 points
    assert again[-1].summary["certify/acr"] == pytest.approx(summary["acr"]) and summary["num_points"] == 15
    assert run.summary["certify/num_points"] == 12
    (points,) = run.logged("certify/points")
    table = run.table(points, "certify/points")
    tsv = read_tsv(out / TSV_NAME)
    assert table["columns"] == list(tsv) and len(table["data"]) == 12
    assert [row[0] for row in table["data"]] == tsv["idx"][:12].tolist()
    assert all(isinstance(row[0], int) for row in table["data"]), "integer columns stay integers"
    used = [a for a in run.artifacts if a.type == "model"]
    assert len(used) == 1 and used[0].use_after_commit and used[0].name == f"model-{fit.run.run_id}"
    assert used[0].digest in {a.digest for a in fit.artifacts if a.type == "model"}, "matched by digest"
    (results,) = [a for a in run.artifacts if a.type == "certify-results"]
    assert {c.path for c in results.manifest.contents} >= {TSV_NAME, "summary.json", "settings.json",
                                                           "certified_accuracy.png"}


def test_certify_rerun_continues_the_same_run_and_compare_logs_an_overlay(certified):
    out, first, again, said = certified
    assert len(again) == 2 and {r.run.run_id for r in again} == {first.run.run_id}, "one W&B run for one result"
    rerun = again[-1]
    (points,) = rerun.logged("certify/points")
    assert len(rerun.table(points, "certify/points")["data"]) == 15
    assert rerun.logged("certify/compare_table")
    assert rerun.config["_wandb"]["visualize"]["certify/compare"]["panel_config"]["fieldSettings"]["stroke"] == "run"
    lines = [line for line in said.splitlines() if line.startswith("W&B:")]
    assert len(lines) == 1 and f"wandb sync {rerun.folder}" in lines[0]
    assert "anonymous" not in said and "wandb:" not in said, "W&B's own messages stay quiet"


def test_test_writes_its_own_folder_and_never_changes_the_fit_config(trained, capfd):
    root, checkpoint, fit = trained
    before = (root / "run" / "config.yaml").read_bytes()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_SILENT", "true")
        cli = cli_main(["test", "--ckpt_path", checkpoint, "--trainer.max_epochs", "30", *QUIET,
                        "--trainer.default_root_dir", str(root / "run")])
    assert (root / "run" / "config.yaml").read_bytes() == before
    assert yaml.safe_load((root / "run" / "test" / "config.yaml").read_text())["trainer"]["max_epochs"] == 30
    (tested,) = runs(root / "run" / "test")
    assert tested.run.job_type == "test" and tested.run.run_group == fit.run.run_group
    assert "anonymous" not in "".join(capfd.readouterr())


@pytest.mark.parametrize("class_path, kind", [("lightning_idrs.sigma.ConstantSigma", "RS"),
                                              ("lightning_idrs.sigma.KnnSigma", "IDRS"),
                                              ("my_lab.sigmas.LearnedSigma", "LearnedSigma")])
def test_the_kind_of_sigma_names_the_runs(class_path, kind):
    assert sigma_kind(class_path) == kind


def test_dashboard_panels_refer_to_keys_our_runs_log(trained, certified, tmp_path):
    from lightning_idrs.commands.dashboard import build_workspace

    _, _, fit = trained
    _, _, again, _ = certified
    logged = [fit, *again]
    history = {k.rsplit("/", i)[0] for r in logged for step in r.history for k in step for i in range(3)}  # media
    summary = {k for r in logged for k in r.summary}
    tables = {}
    for r in logged:
        for step in r.history:
            for key in step:
                if key.endswith("_table/path"):
                    tables[key[:-len("/path")]] = r.table(step, key[:-len("/path")])["columns"]
    workspace = build_workspace("lightning-idrs", radii=(0.2, 0.4))
    panels = [panel for section in workspace.sections for panel in section.panels]
    assert len(panels) >= 10
    for panel in panels:
        kind = type(panel).__name__
        if kind == "CustomChart":
            table = panel.query["summaryTable"]["tableKey"]
            assert table in tables, table
            assert set(panel.chart_fields.values()) <= set(tables[table]) | {"name"}, (table, panel.chart_fields)
        elif kind == "LinePlot":
            assert {panel.x, *panel.y} <= history, (panel.title, {panel.x, *panel.y} - history)
        elif kind == "BarPlot":
            assert set(panel.metrics) <= summary, set(panel.metrics) - summary
            assert panel.groupby.name == "sigma.class_path" and again[0].config["sigma"]["class_path"]
        elif kind == "MediaBrowser":
            assert set(panel.media_keys) <= history
        else:
            pytest.fail(f"a panel of an unchecked kind: {kind}")
    out = tmp_path / "dashboard.json"
    assert main(["dashboard", "--project", "lightning-idrs", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())
    assert spec["project"] == "lightning-idrs" and "certify/curve_table" in out.read_text()


def test_dashboard_bad_options_get_one_line(tmp_path, capsys):
    assert main(["dashboard", "--save", "true", "--out", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --save true needs --entity (your W&B user or team)"] and not (tmp_path / "d.json").exists()
    assert main(["dashboard", "--radii", "[-0.5]"]) == 2
    assert capsys.readouterr().err.strip() == "error: --radii must be a finite number >= 0, got -0.5"
