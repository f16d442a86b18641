"""``python -m lightning_idrs certify`` on a small digits checkpoint: outputs, radii, resume, bad input."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_idrs.commands.certify import main
from lightning_idrs.checkpoint import load_checkpoint
from lightning_idrs.commands.fit import cli_main
from lightning_idrs.data import DigitsDataModule
from lightning_idrs.module import IDRSClassifier
from lightning_idrs.radius import certified_radius, cohen_radius
from lightning_idrs.reporting import PLOT_NAME, SUMMARY_NAME, read_summary
from lightning_idrs.tsv_log import TSV_HEADER, TSV_NAME, read_tsv
from tests.helpers import ENV, SMALL, TWO_RANKS, run_slurm_tasks, same_rows, slurm_env


def certify_args(checkpoint, out, *extra):
    return ["--ckpt_path", str(checkpoint), *SMALL, "--certify.out", str(out), *extra]


def worst_case_at_both_ends(p_b, sigma0, r, radius, dim, slack=0.0):
    """xi(R) of Sukenik et al. (Thm. 2.3 / docs/math.md) straight from scipy.stats.ncx2, at sigma1 =
    sigma0 e^(-(rR + slack)) and sigma0 e^(rR + slack): the largest runner-up probability at distance R."""
    from scipy.stats import ncx2

    values = []
    for sign in (-1.0, 1.0):
        sigma1 = sigma0 * np.exp(sign * (r * radius + slack))
        lam0, lam1 = (s**2 * radius**2 / (sigma0**2 - sigma1**2) ** 2 for s in (sigma0, sigma1))
        ratio = sigma0**2 / sigma1**2
        if sigma1 < sigma0:
            values.append(ncx2.cdf(ratio * ncx2.ppf(p_b, dim, lam0), dim, lam1))
        else:
            values.append(1 - ncx2.cdf(ratio * ncx2.ppf(1 - p_b, dim, lam0), dim, lam1))
    return values


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """30 test points (every 3rd), certified in-process in one uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(certify_args(checkpoint, out, "--certify.skip", "3", "--certify.max", "30")) == 0
    return out


@pytest.mark.slow
def test_outputs_radii_and_summary_agree(reference, checkpoint):
    assert (reference / TSV_NAME).read_text().splitlines()[0] == "\t".join(TSV_HEADER)
    tsv, summary = read_tsv(reference / TSV_NAME), read_summary(reference / SUMMARY_NAME)
    np.testing.assert_array_equal(tsv["idx"], np.arange(0, 90, 3))
    test = DigitsDataModule().split_dataset("test")
    np.testing.assert_array_equal(tsv["label"], [test[i][1] for i in tsv["idx"]])

    # the certificate used sigma(x) of the checkpoint's IDRS sigma and r * Lip(phi)
    model = IDRSClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    model.attach_data(DigitsDataModule())
    computed = model.sigma(torch.stack([test[i][0] for i in tsv["idx"]]))  # float32, as the noise used it
    sigma = computed.double().numpy()
    np.testing.assert_array_equal(tsv["sigma"], sigma)
    assert sigma.std() > 0
    r, dim = summary["semi_elasticity"], summary["dim"]
    assert r == model.sigma.semi_elasticity == model.sigma.r == 0.2 and dim == 64
    assert summary["sigma"]["init_args"]["sigma_base"] == 0.25 and summary["sigma_label"] == model.sigma.label
    assert (summary["alpha"], summary["n0"], summary["n"]) == (0.001, 10, 200)

    # rows: abstain iff pA_lower < 1/2 (predict -1, radius 0, incorrect); radius = IDRS radius < Cohen's
    abstain = tsv["predict"] == -1
    np.testing.assert_array_equal(abstain, tsv["p_a_lower"] < 0.5)
    assert (tsv["radius"][abstain] == 0).all() and (tsv["correct"][abstain] == 0).all()
    np.testing.assert_array_equal(tsv["correct"], (tsv["predict"] == tsv["label"]).astype(int))
    # the radius allows for the rounding of sigma to float32 and the kNN sigma's float64 error, at x and y
    slack = 2 * model.sigma.log_error(computed, 40 * computed.double()).numpy()
    assert (slack > 1.19e-7).all() and (slack < 1.2e-7).all()
    np.testing.assert_allclose(tsv["radius"], certified_radius(tsv["p_a_lower"], tsv["sigma"], r, dim, slack),
                               rtol=1e-12)
    assert (tsv["radius"] <= certified_radius(tsv["p_a_lower"], tsv["sigma"], r, dim)).all()
    certified = ~abstain
    assert certified.sum() >= 10 and tsv["correct"].sum() >= 10
    # independently of the package's radius code: at each certified radius the paper's worst case (SciPy's
    # noncentral chi-square at both ends of sigma1's interval, slack included) stays below 1/2, and 2% further
    # out it does not (the radius is not needlessly small)
    for p_a, sigma0, radius, s in zip(tsv["p_a_lower"][certified], sigma[certified], tsv["radius"][certified],
                                      slack[certified]):
        assert max(worst_case_at_both_ends(1 - p_a, sigma0, r, radius, dim, s)) < 0.5
        assert max(worst_case_at_both_ends(1 - p_a, sigma0, r, radius * 1.02, dim, s)) >= 0.5
    cohen = cohen_radius(tsv["p_a_lower"], tsv["sigma"])
    assert (tsv["radius"][certified] < cohen[certified] * (1 - 1e-6)).all()

    # summary.json agrees with the TSV
    assert summary["num_points"] == 30
    assert len(summary["certified_accuracy"]) >= 3
    for key, acc in summary["certified_accuracy"].items():
        assert acc == pytest.approx(np.mean((tsv["correct"] == 1) & (tsv["radius"] >= float(key))), abs=1e-12)
    assert summary["acr"] == pytest.approx(np.mean(tsv["radius"] * tsv["correct"]))
    assert summary["abstain_rate"] == pytest.approx(abstain.mean())
    for label, curve in summary["class_certified_accuracy"].items():
        mine = tsv["label"] == int(label)
        assert curve["0"] == pytest.approx(tsv["correct"][mine].mean())
    png = (reference / PLOT_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.slow
def test_subprocess_run_reproduces_rows_and_reports(reference, checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_idrs", "certify",
         *certify_args(checkpoint, out, "--certify.skip", "3", "--certify.max", "30",
                       "--certify.compare", str(reference / TSV_NAME))],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "certified accuracy: R=0:" in result.stdout and "ACR" in result.stdout
    assert same_rows(out, reference)  # same seed, same chunks: identical certificates in a new process
    data = load_checkpoint(checkpoint).datamodule  # the data's fingerprints: the same in a new process
    summary = read_summary(out / SUMMARY_NAME)
    assert (summary["data_fingerprint"], summary["split_fingerprint"]) == (data.fingerprint(), data.fingerprint("test"))
    assert (out / PLOT_NAME).is_file()

    bad = main(["--ckpt_path", str(tmp_path / "missing.ckpt"), "--certify.alpha", "1.5"])
    err = capsys.readouterr().err  # bad options fail fast with one line, before the checkpoint is looked at
    assert bad == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: --certify.alpha must be a number in (0, 1), got 1.5"


@pytest.mark.slow
def test_resume_after_torn_write_and_extension(reference, checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    args = certify_args(checkpoint, out, "--certify.skip", "3", "--certify.max", "30")
    assert main(args) == 0
    # simulate a kill: keep the header and 13 rows (chunk 1 half done), then a torn partial line
    lines = (out / TSV_NAME).read_text().splitlines(keepends=True)
    (out / TSV_NAME).write_text("".join(lines[:14]) + "42\t5\t5\t0.1")
    assert main(args) == 0
    assert "dropped" in capsys.readouterr().err
    assert same_rows(out, reference)
    assert len((out / TSV_NAME).read_text().splitlines()) == 31
    # a larger --certify.max extends the run (max is not a setting); the first 30 rows stay
    assert main(certify_args(checkpoint, out, "--certify.skip", "3", "--certify.max", "40")) == 0
    tsv = read_tsv(out / TSV_NAME)
    np.testing.assert_array_equal(tsv["idx"], np.arange(0, 120, 3))
    np.testing.assert_array_equal(tsv["radius"][:30], read_tsv(reference / TSV_NAME)["radius"])


@pytest.mark.slow
def test_sigkill_mid_run_loses_no_row_and_resumes_exactly(checkpoint, tmp_path):
    args = ["--certify.points_per_chunk", "2", "--certify.max", "6"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    result = subprocess.run(  # the fault hook SIGKILLs the run right after the rows of chunks 0 and 1 are written
        [sys.executable, "-m", "lightning_idrs", "certify", *certify_args(checkpoint, killed, *args)],
        cwd=tmp_path, env=dict(ENV, LIGHTNING_IDRS_FAULT="kill-after-chunks=2"), capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert (killed / TSV_NAME).read_bytes().count(b"\n") == 5  # the header and 4 whole rows, nothing torn
    np.testing.assert_array_equal(read_tsv(killed / TSV_NAME)["idx"], np.arange(4))
    assert main(certify_args(checkpoint, killed, *args)) == 0
    assert main(certify_args(checkpoint, straight, *args)) == 0
    assert same_rows(killed, straight)
    np.testing.assert_array_equal(read_tsv(killed / TSV_NAME)["idx"], np.arange(6))


def test_config_sections_set_data_and_certify_defaults(checkpoint, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("trainer:\n  max_epochs: 1\ndata:\n  class_path: lightning_idrs.data.DigitsDataModule\n"
                      "  init_args:\n    seed: 0\ncertify:\n  n: 150\n  max: 7\n  split: val\n")
    out = tmp_path / "run"
    args = ["--ckpt_path", str(checkpoint), "--config", str(config), "--certify.n0", "10", "--certify.max", "3",
            "--certify.out", str(out), "--wandb.mode", "disabled"]
    assert main(args) == 0
    summary = read_summary(out / SUMMARY_NAME)
    assert (summary["n"], summary["split"], summary["num_points"]) == (150, "val", 3)  # the flag beats the config


def write_config(path, text):
    path.write_text(text)
    return str(path)


def corrupt_checkpoint(path):
    path.write_bytes(os.urandom(4096))
    return str(path)


DATA = "data:\n  class_path: lightning_idrs.data.{}DataModule\n  init_args:\n    {}\n"
BAD_INPUTS = {
    "missing checkpoint": (lambda c, t: ["--ckpt_path", str(t / "nope.ckpt")], "not found"),
    "corrupt checkpoint": (lambda c, t: ["--ckpt_path", corrupt_checkpoint(t / "bad.ckpt")], "corrupt"),
    "other data (seed)": (
        lambda c, t: ["--ckpt_path", str(c), "--config", write_config(t / "d.yaml", DATA.format("Digits", "seed: 1"))],
        "fingerprint",
    ),
    "other input size": (
        lambda c, t: ["--ckpt_path", str(c), "--config", write_config(t / "m.yaml", DATA.format("MNIST", "root: x"))],
        "input shape",
    ),
    "alpha 1.5 first": (lambda c, t: ["--ckpt_path", str(t / "nope.ckpt"), "--certify.alpha", "1.5"], "alpha"),
    "n0 = 0": (lambda c, t: ["--ckpt_path", str(c), "--certify.n0", "0"], "--certify.n0"),
    "n = 0": (lambda c, t: ["--ckpt_path", str(c), "--certify.n", "0"], "--certify.n "),
    "batch_size = 0": (lambda c, t: ["--ckpt_path", str(c), "--certify.batch_size", "0"], "batch_size"),
    "root for digits": (lambda c, t: ["--ckpt_path", str(c), "--data.root", str(t)], "root"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_error_line(case, checkpoint, tmp_path, capsys):
    make_args, needle = BAD_INPUTS[case]
    out = tmp_path / "out"
    code = main([*SMALL, "--certify.out", str(out), *make_args(checkpoint, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, err
    assert not out.exists(), "nothing may be written for a bad input"


def test_rerun_with_other_settings_into_same_directory_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(certify_args(checkpoint, out, "--certify.max", "2")) == 0
    before = (out / TSV_NAME).read_bytes()
    code = main(certify_args(checkpoint, out, "--certify.max", "2", "--certify.n", "100"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "different settings" in err and "n: 200 in the directory, 100 now" in err
    assert (out / TSV_NAME).read_bytes() == before
    # the weight layout moves the logits by rounding, so it is a setting of the rows too
    code = main(certify_args(checkpoint, out, "--certify.max", "2", "--certify.channels_last", "false"))
    err = capsys.readouterr().err
    assert code == 2 and "different settings" in err and "memory_format" in err
    assert (out / TSV_NAME).read_bytes() == before


@pytest.mark.slow
def test_a_model_that_cannot_run_channels_last_gets_one_line_and_the_way_out(viewcnn_arch, tmp_path, capsys):
    cli = cli_main(["fit", "--model.arch", viewcnn_arch, "--trainer.max_epochs", "1", "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false"])
    viewcnn = cli.trainer.checkpoint_callback.best_model_path
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(certify_args(viewcnn, out, "--certify.max", "3")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: the base classifier cannot run with channels-last weights: view size")
    assert err.strip().endswith("use --certify.channels_last false") and not out.exists()
    assert main(certify_args(viewcnn, out, "--certify.max", "3", "--certify.channels_last", "false")) == 0
    assert len(read_tsv(out / TSV_NAME)["idx"]) == 3


def test_wandb_offline_run_folder_inside_output(checkpoint, tmp_path):
    out = tmp_path / "run"
    args = certify_args(checkpoint, out, "--certify.max", "3")
    args[args.index("disabled")] = "offline"
    assert main(args) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].rglob("files/media/images/**/*.png"))
    assert list(runs[0].rglob("files/media/table/**/*.table.json"))


# ------------------------------------------------------------------------------------ several processes
def run_certify(checkpoint, out, *extra, **environment):
    command = [sys.executable, "-m", "lightning_idrs", "certify", *certify_args(checkpoint, out, *extra)]
    return subprocess.run(command, env=dict(ENV, **environment), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_give_the_rows_of_one(reference, checkpoint, tmp_path):
    out = tmp_path / "two"
    result = run_certify(checkpoint, out, "--certify.skip", "3", "--certify.max", "30", *TWO_RANKS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert same_rows(out, reference)
    assert read_summary(out / SUMMARY_NAME)["processes"] == 2


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_with_one_process(checkpoint, tmp_path):
    args = ["--certify.points_per_chunk", "2", "--certify.max", "12"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    # rank 0, the one that writes, is SIGKILLed right after it wrote the second round (chunks 0-3); rank 1 then
    # stops because its peer died (capture_output waits for both: rank 1 holds the pipes too)
    result = run_certify(checkpoint, killed, *args, *TWO_RANKS, LIGHTNING_IDRS_FAULT="kill-after-chunks=4@rank0")
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    np.testing.assert_array_equal(read_tsv(killed / TSV_NAME)["idx"], np.arange(8))
    assert main(certify_args(checkpoint, killed, *args)) == 0  # resumed by one process
    assert main(certify_args(checkpoint, straight, *args)) == 0
    assert same_rows(killed, straight)
    np.testing.assert_array_equal(read_tsv(killed / TSV_NAME)["idx"], np.arange(12))


@pytest.mark.parametrize("flags, message", [
    (["--certify.devices", "0"], "--certify.devices must be an integer >= 1, got 0"),
    (["--certify.num_nodes", "0"], "--certify.num_nodes must be an integer >= 1, got 0"),
    (["--certify.accelerator", "gpu"], "--certify.accelerator gpu: no CUDA GPU is available"),
    (["--certify.device", "cuda"], "--certify.device cuda: no CUDA GPU is available"),
    (["--certify.accelerator", "tpu"], "--certify.accelerator must be one of auto, cpu, gpu, got tpu"),
    (["--certify.precision", "8-bit"], "--certify.precision must be one of 32-true, bf16-mixed, 16-mixed, got 8-bit"),
])
def test_bad_distributed_options(flags, message, checkpoint, tmp_path, capsys):
    if "gpu" in message or "cuda" in message:
        if torch.cuda.is_available():
            pytest.skip("a GPU is available")
    out = tmp_path / "out"
    assert main(certify_args(checkpoint, out, *flags)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: " + message), err
    assert not out.exists()


@pytest.mark.slow
def test_processes_started_by_torchrun_or_slurm_give_the_rows_of_one(reference, checkpoint, tmp_path):
    args = certify_args(checkpoint, tmp_path / "torchrun", "--certify.skip", "3", "--certify.max", "30", *TWO_RANKS)
    # --standalone: torchrun's agent binds its rendezvous store on a port of the OS's choice and the ranks join
    # it there; no port is picked for it in advance (one could be taken before it is bound)
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "lightning_idrs", "certify", *args],
                              env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    args = certify_args(checkpoint, tmp_path / "slurm", "--certify.skip", "3", "--certify.max", "30", *TWO_RANKS)
    results = run_slurm_tasks([["certify", *args]] * 2, cwd=tmp_path)
    assert [code for _, _, code in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    for out in ("torchrun", "slurm"):
        assert same_rows(tmp_path / out, reference)
        assert read_summary(tmp_path / out / SUMMARY_NAME)["processes"] == 2


TORCHRUN_2 = {"TORCHELASTIC_RUN_ID": "none", "RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, flags, message", [
    (TORCHRUN_2, [], "torchrun started 2 processes but --certify.devices x --certify.num_nodes = 1 x 1 = 1; make "
                     "them match"),
    (slurm_env(0), ["--certify.devices", "3"], "SLURM started 2 processes but --certify.devices x "
                                               "--certify.num_nodes = 3 x 1 = 3"),
    (slurm_env(0, per_node=1), TWO_RANKS, "SLURM started 1 process(es) per node but --certify.devices is 2 (and "
                                          "--certify.num_nodes 1); set --certify.devices 1 --certify.num_nodes 2"),
    (dict(TORCHRUN_2), ["--certify.num_nodes", "2"], "torchrun started 2 process(es) per node but --certify.devices "
                                                     "is 1 (and --certify.num_nodes 2); set --certify.devices 2 "
                                                     "--certify.num_nodes 1"),
])
def test_options_that_do_not_match_the_launcher_are_refused(env, flags, message, checkpoint, tmp_path, capsys,
                                                            monkeypatch):
    """Otherwise each process started by torchrun / srun would run a certify job of its own."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    assert main(certify_args(checkpoint, out, *flags)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: " + message), err
    assert not out.exists()


# ------------------------------------------------------------------------------------ sequential
@pytest.mark.slow
def test_sequential_certification_from_the_command_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "seq"
    args = ["--ckpt_path", str(checkpoint), "--certify.n0", "10", "--certify.n", "20000", "--certify.max", "20",
            "--certify.out", str(out), "--wandb.mode", "disabled", "--certify.sequential", "true",
            "--certify.radii", "0.25,0.5,0.75,1.0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    tsv, summary = read_tsv(out / TSV_NAME), read_summary(out / SUMMARY_NAME)
    assert set(tsv["samples"]) <= {1000, 3162, 10000, 20000} and (tsv["samples"] < 20000).any()
    assert summary["total_samples"] == tsv["samples"].sum() and summary["mean_samples"] == tsv["samples"].mean()
    assert summary["radii"] == [0.25, 0.5, 0.75, 1.0] and summary["sequential"] is True
    assert "estimation samples" in printed
    fixed = tmp_path / "fixed"
    assert main(["--ckpt_path", str(checkpoint), "--certify.n0", "10", "--certify.n", "20000", "--certify.max", "20",
                 "--certify.out", str(fixed), "--wandb.mode", "disabled"]) == 0
    assert read_tsv(fixed / TSV_NAME)["samples"].tolist() == [20000] * 20


def test_sequential_needs_a_grid(checkpoint, tmp_path, capsys):
    assert main(certify_args(checkpoint, tmp_path / "o", "--certify.sequential", "true")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: --certify.sequential true needs the radius grid it decides on")
