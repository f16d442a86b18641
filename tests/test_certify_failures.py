"""certify's bad and poor cases of an adversarial review: each is one clear line, the documented exit code,
and nothing half-written (multi-process cases with two gloo processes on this machine)."""
import errno
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_idrs.commands import main
from lightning_idrs.module import CHECKPOINT_KEY
from lightning_idrs.reporting import SUMMARY_NAME
from lightning_idrs.tsv_log import TSV_NAME, read_tsv
from tests.helpers import ENV, SMALL, TWO_RANKS, run_slurm_tasks, same_rows


def one_line(capsys, argv, start, code=2):
    """``argv`` fails with exactly one stderr line beginning with ``start`` (besides the progress bar of
    points certified before the failure)."""
    assert main(["certify", *argv]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("certify: ")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(start), err
    return lines[0]


def edited(checkpoint, target: Path, edit) -> Path:
    """A copy of ``checkpoint`` after ``edit(state)``, with a digest of its (possibly new) weights."""
    from lightning_idrs.digests import state_dict_sha256

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    edit(state)
    if state[CHECKPOINT_KEY].get("weights_sha256"):
        state[CHECKPOINT_KEY]["weights_sha256"] = state_dict_sha256(state["state_dict"])
    torch.save(state, target)
    return target


def args(checkpoint, out, *extra):
    return ["--ckpt_path", str(checkpoint), *SMALL, "--certify.out", str(out), *extra]


# ------------------------------------------------------------------------------------ BAD
@pytest.mark.slow
def test_help_and_runs_write_nothing_to_a_read_only_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    result = subprocess.run([sys.executable, "-m", "lightning_idrs", "certify", "--help"], env=dict(ENV, HOME=str(home)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--certify.n0" in result.stdout
    assert result.stderr == ""  # no matplotlib warning about an unwritable config folder
    assert list(home.rglob("*")) == []


@pytest.mark.slow
def test_several_nodes_without_a_launcher_are_refused_at_once(checkpoint, tmp_path):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lightning_idrs", "certify",
                             *args(checkpoint, tmp_path / "o", "--certify.num_nodes", "2")],
                            env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and time.monotonic() - start < 60
    assert result.stderr.strip() == ("error: --certify.num_nodes 2 needs the processes of the other nodes, which only "
                                     "torchrun or SLURM (srun) start; launch the command with one of them, or use "
                                     "--certify.num_nodes 1")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ranks_on_different_checkpoints_stop_before_the_first_point(checkpoint, tmp_path):
    other = edited(checkpoint, tmp_path / "other.ckpt",
                   lambda s: next(v for v in s["state_dict"].values() if torch.is_tensor(v)).view(-1)[:1].add_(0.5))
    out = tmp_path / "out"
    results = run_slurm_tasks([["certify", *args(path, out, "--certify.max", "4", *TWO_RANKS)]
                               for path in (checkpoint, other)], cwd=tmp_path)
    assert [code for _, _, code in results] == [2, 2], results
    for _, err, _ in results:
        assert err.strip().splitlines()[-1].startswith("error: the processes of the job do not agree on "
                                                       "checkpoint_sha256"), err
    assert not (out / TSV_NAME).exists()


@pytest.mark.slow
def test_slurm_tasks_on_a_taken_port_are_started_again(checkpoint, tmp_path):
    """What run_slurm_tasks relies on: rank 0 on a MASTER_PORT another process took stops at once with
    "address already in use" (the helper then starts the job again on another port)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(AssertionError, match="every port tried for MASTER_PORT was taken by another process"):
            run_slurm_tasks([["certify", *args(checkpoint, tmp_path / "o", *TWO_RANKS)]] * 2, cwd=tmp_path,
                            ports=[other.getsockname()[1]])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, message", [
    (0.3, "now reports semi_elasticity 0.3, but {ckpt} recorded 0.2 when it was trained: the class changed since"),
    (-0.1, "error: the sigma class lightning_idrs.sigma.KnnSigma reports semi_elasticity -0.1: it must be a finite"),
])
def test_a_sigma_class_that_changed_since_fit_is_refused(change, message, checkpoint, tmp_path, capsys,
                                                         monkeypatch):
    from lightning_idrs.sigma import KnnSigma

    monkeypatch.setattr(KnnSigma, "semi_elasticity", property(lambda self: change))
    err = one_line(capsys, args(checkpoint, tmp_path / "o"), "error: ")
    assert message.format(ckpt=checkpoint) in err
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_without_a_weights_digest_is_refused(checkpoint, tmp_path, capsys):
    bare = edited(checkpoint, tmp_path / "bare.ckpt", lambda s: s[CHECKPOINT_KEY].pop("weights_sha256"))
    one_line(capsys, args(bare, tmp_path / "o"), f"error: {bare} records no digest of its weights")


# ------------------------------------------------------------------------------------ POOR: files and values
@pytest.mark.parametrize("value", ["nan", "0", "-1"])
def test_a_sigma_function_with_bad_values_is_one_line(value, checkpoint, tmp_path, capsys, monkeypatch):
    from lightning_idrs.sigma import KnnSigma

    monkeypatch.setattr(KnnSigma, "forward", lambda self, x: torch.full((len(x),), float(value)))
    one_line(capsys, args(checkpoint, tmp_path / "o"), "error: sigma(x) must be finite and > 0 for every input, but "
                                                       f"KnnSigma gave {float(value)}")


@pytest.mark.parametrize("flags, start", [
    (["--certify.radii", "[]"], "error: --certify.radii must be a list of radii >= 0 such as 0.25,0.5,0.75,1.0, "
                                "got []"),
    (["--certify.precision", "16-mixed", "--certify.accelerator", "cpu"],
     "error: --certify.precision 16-mixed needs a CUDA GPU (on CPU Lightning runs bf16 instead)"),
    (["--certify.seed", "4294967296"], "error: --certify.seed must be an integer from 0 to 4294967295 (2^32 - 1), "
                                       "got 4294967296"),
    (["--certify.seed", "-1"], "error: --certify.seed must be an integer from 0 to 4294967295 (2^32 - 1), got -1"),
])
def test_bad_values_are_one_line(flags, start, checkpoint, tmp_path, capsys):
    one_line(capsys, args(checkpoint, tmp_path / "o", *flags), start)
    assert not (tmp_path / "o").exists()


def test_an_output_folder_that_is_a_file_and_a_compare_that_is_no_tsv(checkpoint, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    one_line(capsys, args(checkpoint, afile), f"error: --certify.out {afile} is a file, not a folder")
    err = one_line(capsys, args(checkpoint, tmp_path / "o", "--certify.compare", str(afile)),
                   f"error: --certify.compare {afile} is not a certify.tsv of this version")
    assert "output directory" not in err and "--certify.out" not in err


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes(checkpoint, tmp_path, capsys, monkeypatch):
    import lightning_idrs.reporting
    import lightning_idrs.tsv_log

    write, calls = lightning_idrs.tsv_log._write_all, []

    def fills_up(fd, data):
        calls.append(len(data))
        if len(calls) > 2:  # the header and the first round of rows fit
            raise OSError(errno.ENOSPC, "No space left on device")
        write(fd, data)

    monkeypatch.setattr(lightning_idrs.tsv_log, "_write_all", fills_up)
    out, straight = tmp_path / "full", tmp_path / "straight"
    flags = ["--certify.max", "6", "--certify.points_per_chunk", "2"]
    one_line(capsys, args(checkpoint, out, *flags), f"error: no space left on the disk of {out}: free space, then rerun")
    assert len(read_tsv(out / TSV_NAME)["idx"]) == 2
    monkeypatch.setattr(lightning_idrs.tsv_log, "_write_all", write)

    def no_png(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lightning_idrs.reporting, "plot_curves", no_png)  # full again when the plot is drawn
    one_line(capsys, args(checkpoint, out, *flags), f"error: no space left on the disk of {out}")
    monkeypatch.undo()
    assert main(["certify", *args(checkpoint, out, *flags)]) == 0
    assert main(["certify", *args(checkpoint, straight, *flags)]) == 0
    assert same_rows(out, straight) and (out / SUMMARY_NAME).is_file()


@pytest.mark.parametrize("edit, start, absent", [
    (lambda s: s["state_dict"].__setitem__("model.extra", torch.zeros(1)), "the weights of {} do not fit its model: ",
     "importable"),
    (lambda s: s["hyper_parameters"]["sigma"].__setitem__("class_path", "nonexist_mod.Foo"),
     "the sigma class nonexist_mod.Foo of {} cannot be imported: there is no module 'nonexist_mod'", "Traceback"),
    (lambda s: s["hyper_parameters"]["sigma"].update(class_path="torch.nn.ReLU", init_args={}),
     "torch.nn.ReLU (the sigma of {}) is not a sigma function: it must subclass lightning_idrs.sigma.Sigma", "Trace"),
])
def test_checkpoint_problems_name_the_cause_without_unrelated_hints(edit, start, absent, checkpoint, tmp_path,
                                                                    capsys):
    bad = edited(checkpoint, tmp_path / "bad.ckpt", edit)
    err = one_line(capsys, args(bad, tmp_path / "o"), "error: " + start.format(bad))
    assert absent not in err


# ------------------------------------------------------------------------------------ POOR: signals and dead ranks
FLAGS = ["--certify.points_per_chunk", "2", "--certify.max", "16"]


def two_ranks_stopped_by(fault, checkpoint, out):
    """A two-process job that the fault hook ``fault`` stops after its first round (chunks 0 and 1: 4 rows).
    A session of its own: a SIGTERM to the job's process group reaches the job, not the test. Returns once
    both processes are gone (both hold the pipes)."""
    return subprocess.run([sys.executable, "-m", "lightning_idrs", "certify",
                           *args(checkpoint, out, *FLAGS, *TWO_RANKS)],
                          env=dict(ENV, LIGHTNING_IDRS_FAULT=fault), capture_output=True, text=True, timeout=300,
                          start_new_session=True)


@pytest.mark.slow
def test_sigterm_stops_every_rank_with_one_message_and_resumes(checkpoint, tmp_path):
    out = tmp_path / "run"
    # rank 0 sends SIGTERM to the job's process group (what a scheduler does) right after writing the first round
    result = two_ranks_stopped_by("term-after-chunks=2@rank0", checkpoint, out)
    err = result.stderr
    assert result.returncode == 143, err
    assert err.count("stopped by SIGTERM") == 1 and "Traceback" not in err, err
    assert read_tsv(out / TSV_NAME)["idx"].tolist() == [0, 1, 2, 3]
    assert main(["certify", *args(checkpoint, out, *FLAGS)]) == 0  # resumed by one process
    assert read_tsv(out / TSV_NAME)["idx"].tolist() == list(range(16))


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_leaves_one_line_and_a_resumable_run(checkpoint, tmp_path):
    out, straight = tmp_path / "run", tmp_path / "straight"
    # rank 1 dies (out of memory, a lost node) right after the first round: rank 0 writes that round, certifies
    # its next chunk and finds its peer gone when it gathers the second round
    result = two_ranks_stopped_by("kill-after-chunks=2@rank1", checkpoint, out)
    err = result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and "another process of the job stopped" in lines[-1], err
    assert lines[-1].endswith("rerun the same command to resume") and err.count("error:") == 1, err
    assert read_tsv(out / TSV_NAME)["idx"].tolist() == [0, 1, 2, 3]
    assert main(["certify", *args(checkpoint, out, *FLAGS)]) == 0
    assert main(["certify", *args(checkpoint, straight, *FLAGS)]) == 0
    assert same_rows(out, straight)


def test_a_malformed_fault_hook_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIGHTNING_IDRS_FAULT", "kill-after=2")
    one_line(capsys, args(checkpoint, tmp_path / "o"), "error: LIGHTNING_IDRS_FAULT=kill-after=2 is not a fault of "
                                                       "the testing hook: kill-after-chunks=N or term-after-chunks=N")
    assert not (tmp_path / "o").exists()
