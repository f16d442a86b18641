"""What a user finds in W&B, read as W&B reads it: the offline ``.wandb`` files of a short fit (two Callback
certifications, the best epoch first), of a certify run (and its rerun), and of ``test``, decoded with W&B's
own protobufs (tests.helpers.WandbRun)."""
import contextlib
import hashlib
import io
import json
from pathlib import Path

import pytest
import yaml

from lightning_idrs.commands import main
from lightning_idrs.commands.fit import cli_main
from lightning_idrs.tsv_log import TSV_NAME, read_tsv
from lightning_idrs.wandb_logging import AXES, sigma_kind
from tests.helpers import ConstantNet, md5_b64, wandb_runs

CALLBACKS = {"trainer": {"callbacks": [
    {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",  # val/loss falls: its largest is epoch 0's
     "init_args": {"monitor": "val/loss", "mode": "max", "filename": "best-{epoch:02d}"}},
    {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"filename": "last"}},
    {"class_path": "pytorch_lightning.callbacks.LearningRateMonitor"},  # a key of a user's, outside our prefixes
    {"class_path": "lightning_idrs.callbacks.CertificationCallback",
     "init_args": {"every_n_epochs": 1, "num_points": 30, "n0": 8, "n": 48, "radii": [0.0, 0.2, 0.4]}}]}}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
NAME = "digits-IDRS-sb0.25-r0.2-seed0"


# ------------------------------------------------------------------------------ one fit, certify, test, shared
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb_fit")
    config = root / "callbacks.yaml"
    config.write_text(yaml.safe_dump(CALLBACKS))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_SILENT", "true")
        cli = cli_main(["fit", "--config", str(config), "--trainer.max_epochs", "2", *QUIET,
                        "--trainer.default_root_dir", str(root / "run")])
    (fit,) = wandb_runs(root / "run")
    best, last = (Path(c.best_model_path) for c in cli.trainer.checkpoint_callbacks)
    return root, best, fit, last


def _certify(checkpoint, out, *extra):
    return main(["certify", "--ckpt_path", str(checkpoint), "--certify.n0", "8", "--certify.n", "64",
                 "--certify.radii", "0,0.2,0.4", "--certify.out", str(out), *extra])


@pytest.fixture(scope="module")
def certified(trained):
    """A certify run of 12 points, then a rerun into the same folder extending it to 15, with two compare curves
    (last.ckpt's run, by its folder, and this run's own TSV)."""
    root, checkpoint, _, last = trained
    out, said = root / "certify", io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_SILENT", "true")
        assert _certify(checkpoint, out, "--certify.max", "12") == 0
        assert _certify(last, root / "certify_last", "--certify.max", "12", "--wandb.mode", "disabled") == 0
        (first,) = wandb_runs(out)
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            assert _certify(checkpoint, out, "--certify.max", "15", "--certify.compare",
                            f"[{root / 'certify_last'}, {out / TSV_NAME}]") == 0
    return out, first, wandb_runs(out), said.getvalue()


@pytest.fixture(scope="module")
def tested(trained):
    root, checkpoint, _, _ = trained
    before = (root / "run" / "config.yaml").read_bytes()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_SILENT", "true")
        cli_main(["test", "--ckpt_path", str(checkpoint), "--trainer.max_epochs", "30", *QUIET,
                  "--trainer.default_root_dir", str(root / "run")])
    assert (root / "run" / "config.yaml").read_bytes() == before, "the fit run's config.yaml stays as it was"
    (run,) = wandb_runs(root / "run" / "test")
    return run


# ------------------------------------------------------------------------------ fit
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
    folders = [wandb_runs(tmp_path / name) for name in ("first", "second", "diverged")]
    assert [len(found) for found in folders] == [1, 1, 1]
    first, second, diverged = (found[0] for found in folders)
    assert len({first.run.run_id, second.run.run_id, diverged.run.run_id}) == 3
    exits = [next(r.exit for r in run.records if r.WhichOneof("record_type") == "exit")
             for run in (first, second, diverged)]
    assert [e.exit_code for e in exits] == [0, 0, 1]


def test_fit_logs_the_nested_config_only_and_a_name_that_says_what_it_is(trained):
    _, _, fit, _ = trained
    config = fit.config
    assert set(config) - {"_wandb"} == {"trainer", "model", "data", "seed_everything"}, \
        "no flat copies of hyper-parameters (sigma, batch_size, _instantiator) beside the nested config"
    assert config["trainer"]["max_epochs"] == 2 and config["seed_everything"] == 0
    assert config["model"]["optimizer"]["init_args"]["lr"] == 0.002
    assert config["model"]["sigma"]["class_path"] == "lightning_idrs.sigma.KnnSigma"
    assert config["model"]["sigma"]["init_args"]["semi_elasticity"] == 0.2
    assert config["data"]["class_path"] == "lightning_idrs.data.DigitsDataModule"
    callback = config["trainer"]["callbacks"][-1]
    assert callback["class_path"].endswith("CertificationCallback") and callback["init_args"]["n"] == 48
    assert fit.run.job_type == "fit" and list(fit.run.tags) == ["digits", "IDRS"]
    assert fit.run.run_group == f"digits-IDRS-{fit.run.run_id}" and fit.run.display_name == NAME


def test_only_the_monitored_checkpoint_is_best(trained):
    """The best epoch is the first (val/loss, mode max), so last.ckpt is another file, logged after it: it must
    carry ``latest`` only, and ``best`` must name the monitored checkpoint's digest."""
    root, best, fit, last = trained
    assert best.name == "best-epoch=00.ckpt" and last.name == "last.ckpt" and md5_b64(best) != md5_b64(last)
    models = [a for a in fit.artifacts if a.type == "model"]
    assert models and {a.name for a in models} == {f"model-{fit.run.run_id}"}
    digests = {a.manifest.contents[0].digest: sorted(a.aliases) for a in models}
    assert digests == {md5_b64(best): ["best", "latest"], md5_b64(last): ["latest"]}
    assert models[-1].manifest.contents[0].digest == md5_b64(last), "last.ckpt, logged last, is `latest`"
    staged = [Path(c.local_path) for a in models for c in a.manifest.contents]
    assert all(path.is_file() and root in path.parents for path in staged), "staged under the run folder"


def _one_axis_each(run) -> None:
    keys = {key for key in run.history_keys() if not key.startswith("_")}
    assert keys, "the run logged nothing"
    for key in keys:
        assert "." not in key and "@" not in key, f"{key}: W&B reads '.' as nesting"
        assert len(run.definitions(key)) == 1, (key, run.definitions(key))
    globs = [m.glob_name for m in run.metrics if m.glob_name]
    assert "*" not in globs and not any(a != b and b.startswith(a[:-1]) for a in globs for b in globs), globs


def test_every_key_of_every_run_has_exactly_one_x_axis(trained, certified, tested):
    _, _, fit, _ = trained
    _, _, certify_runs, _ = certified
    for run in (fit, *certify_runs, tested):
        _one_axis_each(run)
    axes = {m.glob_name or m.name: m.step_metric for m in fit.metrics}
    assert axes["monitor/*"] == axes["val/*"] == "epoch" and axes["train/*"] == "trainer/global_step"
    assert "lr-Adam" in fit.history_keys() and axes["lr-Adam"] == "trainer/global_step", "a user's key: the step"
    assert set(AXES) == {g[:-1] for g in axes if g.endswith("*")}


def test_the_callback_logs_in_the_validation_row_of_its_epoch(trained):
    """Same row, so the same epoch and step as the validation metrics of that epoch (they differed by one)."""
    _, _, fit, _ = trained
    certifications = fit.logged("monitor/acr")
    assert [step["epoch"] for step in certifications] == [0, 1]
    validations = fit.logged("val/noisy_acc")
    assert [(s["epoch"], s["trainer/global_step"]) for s in certifications] == \
        [(s["epoch"], s["trainer/global_step"]) for s in validations]
    for step in certifications:  # a certification's scalars, tables, histogram and plot in that row
        for key in ("val/noisy_acc", "monitor/curve_table", "monitor/class_table", "monitor/sigma", "monitor/plot",
                    "monitor/worst_class_acc_R0p2", "monitor/class_gap_R0p2", "monitor/clean_accuracy"):
            assert any(k == key or k.startswith(key + "/") for k in step), key
    keys = fit.history_keys()
    assert not any(k.startswith("certify/") for k in keys), "monitoring keys are not the reported ones"
    assert {k for k in keys if k.startswith("monitor/acc_")} == {"monitor/acc_R0", "monitor/acc_R0p2",
                                                                 "monitor/acc_R0p4"}, "scalars: the report grid only"


def test_fit_curve_table_grows_finer_than_the_scalars_one_line_per_run_and_epoch(trained):
    _, _, fit, _ = trained
    last = fit.logged("monitor/curve_table")[-1]
    table = fit.table(last, "monitor/curve_table")
    assert table["columns"] == ["epoch", "radius", "certified_accuracy", "split", "n", "num_points", "line"]
    grid = sorted({0.2, 0.4} | {k * 0.125 for k in range(9)})  # the report grid in the curve's 0.125 grid
    assert [row[:2] for row in table["data"]] == [[e, r] for e in (0, 1) for r in grid]
    assert {tuple(row[3:6]) for row in table["data"]} == {("val", 48, 30)}
    assert {row[6] for row in table["data"]} == {f"{NAME} epoch 0", f"{NAME} epoch 1"}
    charts = fit.config["_wandb"]["visualize"]
    assert charts["monitor/curve"]["panel_config"]["fieldSettings"] == {"x": "radius", "y": "certified_accuracy",
                                                                        "stroke": "epoch"}
    assert charts["monitor/class"]["panel_config"]["fieldSettings"]["stroke"] == "class"
    classes = fit.table(last, "monitor/class_table")
    assert classes["columns"] == ["epoch", "class", "radius", "certified_accuracy", "points", "line"]
    assert {row[1] for row in classes["data"]} == set(range(10)) and sum(r[4] for r in classes["data"]) == len(grid) * 30
    assert {row[5] for row in classes["data"]} == {f"{NAME} class {c}" for c in range(10)}
    worst = min(row[3] for row in classes["data"] if row[2] == 0.2)
    assert fit.summary["monitor/worst_class_acc_R0p2"] == pytest.approx(worst)


# ------------------------------------------------------------------------------ certify
def test_certify_run_config_summary_points_tags_name_and_lineage(trained, certified):
    _, checkpoint, fit, _ = trained
    out, run, again, _ = certified
    assert run.run.job_type == "certify" and list(run.run.tags) == ["digits", "IDRS"]
    assert run.run.display_name == f"certify-{NAME}-best-epoch=00-n64"
    assert run.run.run_group == fit.run.run_group, "the certify run joins its checkpoint's fit run"
    assert run.config["sigma"]["class_path"] == "lightning_idrs.sigma.KnnSigma" and run.config["sigma"]["kind"] == "IDRS"
    assert run.config["certify"]["n"] == 64
    described = run.config["checkpoint"]
    trained_with = described["config"]  # the fit run's whole config, read from the checkpoint
    assert all(trained_with[k] == fit.config[k] for k in ("trainer", "model", "data", "seed_everything"))
    assert described["fit_run"] == fit.run.run_id and described["epoch"] == 0 and described["fit_name"] == NAME
    assert described["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert "acr" not in run.config and "clean_accuracy" not in run.config
    summary = json.loads((out / "summary.json").read_text())  # after the rerun: 15 points
    assert again[-1].summary["certify/acr"] == pytest.approx(summary["acr"]) and summary["num_points"] == 15
    assert run.summary["certify/num_points"] == 12
    assert summary["report_radii"] == [0.0, 0.2, 0.4] and summary["radii"][:3] == [0.0, 0.05, 0.1], \
        "the scalars on the report grid, the curve on the finer one"
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
    assert {c.path for c in results.manifest.contents} == {TSV_NAME, "summary.json", "settings.json",
                                                           "certified_accuracy.png"}


def test_certify_rerun_continues_the_same_run_and_compare_overlays_every_run_given(certified):
    out, first, again, said = certified
    assert len(again) == 2 and {r.run.run_id for r in again} == {first.run.run_id}, "one W&B run for one result"
    rerun = again[-1]
    (points,) = rerun.logged("certify/points")
    assert len(rerun.table(points, "certify/points")["data"]) == 15
    (step,) = rerun.logged("certify/compare_table")
    lines = {row[0] for row in rerun.table(step, "certify/compare_table")["data"]}
    assert len(lines) == 3, lines  # this run and the two given, each its own line
    assert rerun.config["_wandb"]["visualize"]["certify/compare"]["panel_config"]["fieldSettings"]["stroke"] == "run"
    lines = [line for line in said.splitlines() if line.startswith("W&B:")]
    assert len(lines) == 1 and f"wandb sync {rerun.folder}" in lines[0]
    assert "anonymous" not in said and "wandb:" not in said, "W&B's own messages stay quiet"


@pytest.mark.slow
def test_forty_grid_radii_keep_the_results_artifact(trained, tmp_path):
    """W&B refuses an artifact with over 100 metadata keys: a fine report grid must not lose the results."""
    _, checkpoint, _, _ = trained
    radii = ",".join(f"{0.05 * k:g}" for k in range(40))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_SILENT", "true")
        assert _certify(checkpoint, tmp_path, "--certify.max", "5", "--certify.radii", radii,
                        "--certify.radii_max", "2") == 0
    (run,) = wandb_runs(tmp_path)
    (results,) = [a for a in run.artifacts if a.type == "certify-results"]
    assert results.name == f"certify-{run.run.run_id}" and TSV_NAME in {c.path for c in results.manifest.contents}
    metadata = json.loads(results.metadata)
    assert len(metadata) <= 12 and len(metadata["certified_accuracy"]) == 40
    assert len([k for k in run.summary if k.startswith("certify/acc_R")]) == 40


# ------------------------------------------------------------------------------ test / validate
def test_a_test_run_describes_the_checkpoint_it_evaluated(trained, tested):
    _, checkpoint, fit, _ = trained
    assert tested.run.job_type == "test" and tested.run.run_group == fit.run.run_group
    assert tested.run.display_name == f"test-{NAME}-best-epoch=00"
    config = tested.config
    assert config["trainer"]["max_epochs"] == 2, "what was trained, not the packaged defaults"
    assert all(config[k] == fit.config[k] for k in ("trainer", "model", "data", "seed_everything"))
    assert config["evaluation"]["trainer"]["max_epochs"] == 30 and "model" not in config["evaluation"]
    assert config["checkpoint"]["path"] == str(checkpoint.resolve()) and config["checkpoint"]["epoch"] == 0
    assert config["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    (used,) = [a for a in tested.artifacts if a.type == "model"]
    assert used.use_after_commit and used.name == f"model-{fit.run.run_id}"
    assert used.manifest.contents[0].digest == md5_b64(checkpoint), "the model artifact of that checkpoint"
    assert tested.logged("test/noisy_acc")


@pytest.mark.parametrize("class_path, kind", [("lightning_idrs.sigma.ConstantSigma", "RS"),
                                              ("lightning_idrs.sigma.KnnSigma", "IDRS"),
                                              ("my_lab.sigmas.LearnedSigma", "LearnedSigma")])
def test_the_kind_of_sigma_names_the_runs(class_path, kind):
    assert sigma_kind(class_path) == kind


def test_run_names_say_what_a_run_is():
    from lightning_idrs.reporting import radius_name, run_name

    knn = {"class_path": "lightning_idrs.sigma.KnnSigma", "init_args": {"sigma_base": 0.25, "semi_elasticity": 0.2}}
    assert run_name("digits", {"sigma": knn}, 0) == NAME
    rs = {"class_path": "lightning_idrs.sigma.ConstantSigma", "init_args": {"sigma_base": 0.5}}
    objective = {"class_path": "lightning_idrs.objectives.ConsistencyRegularization", "init_args": {}}
    assert run_name("mnist5k", {"sigma": rs, "_objective": objective}, 1) == "mnist5k-RS-sb0.5-seed1"
    assert run_name("mnist5k", {"sigma": rs, "objective": objective}) == "mnist5k-RS-sb0.5-consistencyregularization"
    assert [radius_name(r) for r in (0, 0.25, 1.0, 1.5, 0.125)] == ["R0", "R0p25", "R1", "R1p5", "R0p125"]


# ------------------------------------------------------------------------------ the dashboard
def _panel_keys_exist(workspace, runs, sections, optional=()) -> int:
    """Every panel of ``sections`` names keys that ``runs`` logged (but the tables ``optional``, e.g. the overlay of
    --certify.compare); returns how many panels were checked."""
    history = {k for r in runs for k in r.history_keys()}
    summary = {k for r in runs for k in r.summary}
    tables = {}
    for r in runs:
        for step in r.history:
            for key in step:
                if key.endswith("_table/path"):
                    tables[key[:-len("/path")]] = r.table(step, key[:-len("/path")])["columns"]
    checked = 0
    for section in workspace.sections:
        if not any(name in section.name for name in sections):
            continue
        for panel in section.panels:
            kind, checked = type(panel).__name__, checked + 1
            if kind == "CustomChart":
                table = panel.query["summaryTable"]["tableKey"]
                if table in optional:
                    continue
                assert table in tables, table
                assert set(panel.chart_fields.values()) <= set(tables[table]), (table, panel.chart_fields)
            elif kind == "LinePlot":
                assert {panel.x, *panel.y} <= history, (panel.title, {panel.x, *panel.y} - history)
            elif kind == "BarPlot":
                assert set(panel.metrics) <= summary, set(panel.metrics) - summary
                assert panel.groupby.name == "sigma.kind" and all(r.config["sigma"]["kind"] for r in runs
                                                                  if r.run.job_type == "certify")
            elif kind == "MediaBrowser":
                assert set(panel.media_keys) <= history
            else:
                pytest.fail(f"a panel of an unchecked kind: {kind}")
    return checked


def test_dashboard_panels_refer_to_keys_our_runs_log(trained, certified, tmp_path):
    from lightning_idrs.commands.dashboard import RADII, build_workspace
    from lightning_idrs.data import IDRSDataModule

    _, _, fit, _ = trained
    _, _, again, _ = certified
    assert all(set(RADII) <= set(cls.report_radii) for cls in (IDRSDataModule, *IDRSDataModule.__subclasses__(),
                                                               *[c for s in IDRSDataModule.__subclasses__()
                                                                 for c in s.__subclasses__()]))
    workspace = build_workspace("lightning-idrs", radii=(0.2, 0.4), dataset="digits")
    assert _panel_keys_exist(workspace, [fit, *again], ("certify", "monitor")) >= 15
    out = tmp_path / "dashboard.json"
    assert main(["dashboard", "--project", "lightning-idrs", "--dataset", "digits", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())
    assert spec["project"] == "lightning-idrs" and "certify/curve_table" in out.read_text()
    assert "RS vs IDRS on digits" in out.read_text()
    assert '"name": "tags"}, "op": "IN", "value": ["digits"]' in json.dumps(spec), "the runs of that data set only"


@pytest.mark.slow
def test_dashboard_panels_exist_in_a_digits_run_and_in_a_run_whose_radii_reach_three(trained, tmp_path):
    """The scalar keys are the report grid's whatever radii a run reaches: a model certain everywhere at sigma = 1.5
    (radii up to ~4, as CIFAR-10's at sigma = 1) logs the same keys as a digits run whose radii stay below 1."""
    from lightning_idrs.commands.dashboard import build_workspace

    from lightning_idrs.models import MODELS, register_model

    _, checkpoint, _, _ = trained
    register_model("constant")(ConstantNet)
    try:
        cli = cli_main(["fit", "--config", "rs", "--model.sigma.sigma_base", "1.5", "--model.arch", "constant",
                        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.logger", "false",
                        "--trainer.callbacks=[]", *QUIET, "--trainer.default_root_dir", str(tmp_path / "fit")])
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WANDB_SILENT", "true")
            for ckpt, out, n in ((checkpoint, "digits", "64"),
                                 (cli.trainer.checkpoint_callback.best_model_path, "wide", "2000")):
                assert main(["certify", "--ckpt_path", str(ckpt), "--certify.n0", "20", "--certify.n", n,
                             "--certify.max", "10", "--certify.out", str(tmp_path / out)]) == 0
    finally:
        MODELS.pop("constant", None)
    (digits,), (wide,) = wandb_runs(tmp_path / "digits"), wandb_runs(tmp_path / "wide")
    reached = [read_tsv(tmp_path / out / TSV_NAME)["radius"].max() for out in ("digits", "wide")]
    assert reached[0] < 1.0 < 2.5 < reached[1], reached
    assert wide.run.display_name.startswith("certify-digits-RS-sb1.5-epoch=0")  # no seed: fit had no W&B run
    for run in (digits, wide):
        assert _panel_keys_exist(build_workspace("lightning-idrs"), [run], ("certify",), ["certify/compare_table"]) >= 8
    keys = [{k for k, v in run.summary.items() if k.count("/") == 1 and k.startswith("certify/")
             and isinstance(v, (int, float))} for run in (digits, wide)]  # scalars, not a table's or image's fields
    assert keys[0] == keys[1] and len(keys[0]) == 7 + 3 * 7, sorted(keys[1])  # 7 headline, 3 per report radius
    for out in ("digits", "wide"):
        grid = json.loads((tmp_path / out / "summary.json").read_text())["report_radii"]
        assert grid == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5], "the data set's report grid, not the radii reached"


def test_dashboard_bad_options_get_one_line(tmp_path, capsys):
    assert main(["dashboard", "--save", "true", "--out", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --save true needs --entity (your W&B user or team)"] and not (tmp_path / "d.json").exists()
    assert main(["dashboard", "--radii", "[-0.5]"]) == 2
    assert capsys.readouterr().err.strip() == "error: --radii must be a finite number >= 0, got -0.5"
