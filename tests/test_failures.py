"""Bad input, broken models, hostile checkpoints and faults: one `error:` line, exit 2, nothing left to trust."""
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_idrs import load_checkpoint
from lightning_idrs.commands import main
from lightning_idrs.module import CHECKPOINT_KEY
from lightning_idrs.reporting import SUMMARY_NAME, read_summary
from lightning_idrs.tsv_log import TSV_NAME
from lightning_idrs.arguments import UsageError
from tests.helpers import QUIET, env, wait_all

SMALL = ["--certify.n0", "10", "--certify.n", "100", "--wandb.mode", "disabled"]


def fails_cleanly(capsys, argv, message):
    """main(argv) exits 2 with one `error:` line starting with ``message`` and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: " + message), err[-2000:]
    return err


def nothing_to_trust(root: Path):
    """No checkpoint, certificate file or W&B run a later run could pick up."""
    leftovers = [p for p in root.rglob("*") if p.suffix == ".ckpt" or p.name in (TSV_NAME, SUMMARY_NAME)
                 or p.name.startswith(("offline-run-", "run-"))]
    assert not leftovers, leftovers


# ------------------------------------------------------------------------------------ fit / test
FIT_CASES = {
    "sigma_b <= 0": (["--model.sigma.sigma_base", "0"], "--model.sigma.sigma_base must be a finite number > 0, got 0"),
    "r < 0": (["--model.sigma.semi_elasticity", "-0.1"],
              "--model.sigma.semi_elasticity must be a finite number >= 0, got -0.1"),
    "k = 0": (["--model.sigma.k", "0"], "--model.sigma.k must be an integer >= 1, got 0"),
    "k >= training points": (["--model.sigma.k", "5000"], "the model and the data do not fit together: k must be "
                             "smaller than the number of training points (each point is excluded from its own "
                             "neighbours), got k=5000 with 1077 training points"),
    "unknown arch": (["--model.arch", "vgg"], "unknown arch 'vgg'; valid names: lenet, mlp,"),
    "unknown option": (["--model.sigma.sigma_bse", "0.3"],
                       "--model.sigma.sigma_bse is not an option of lightning_idrs.sigma.KnnSigma"),
    "not a number": (["--trainer.max_epochs", "x"], "--trainer.max_epochs: expected int, got x"),
    "not a switch": (["--trainer.enable_progress_bar", "maybe"],
                     "--trainer.enable_progress_bar must be true or false, got maybe"),
    "batch size 0": (["--data.batch_size", "0"], "--data.batch_size must be an integer >= 1, got 0"),
    "sigma overflows": (["--model.sigma.semi_elasticity", "1e6"], "sigma(x) is 0.0 for training point 0"),
    "missing data root": (["--config", "mnist", "--data.root", "{root}/nowhere"],
                          "MNIST data not found under root '{root}/nowhere'"),
    "weights_only false": (["--weights_only", "false"], "--weights_only false is not supported"),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_bad_input(case, tmp_path, capsys):
    flags, message = FIT_CASES[case]
    root = tmp_path / "run"
    flags = [f.format(root=tmp_path) for f in flags]
    fails_cleanly(capsys, ["fit", "--trainer.default_root_dir", str(root), *QUIET, *flags],
                  message.format(root=tmp_path))
    nothing_to_trust(tmp_path)


def test_output_folder_that_is_a_file_or_unwritable(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    fails_cleanly(capsys, ["fit", "--trainer.default_root_dir", str(afile)],
                  f"--trainer.default_root_dir {afile} is a file, not a folder; choose a folder")
    fails_cleanly(capsys, ["fit", "--trainer.default_root_dir", str(afile / "sub")],
                  f"--trainer.default_root_dir {afile / 'sub'} is not a writable folder")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        fails_cleanly(capsys, ["fit", "--trainer.default_root_dir", str(locked)], "--trainer.default_root_dir")
    assert afile.read_text() == "x"


def test_download_without_network_fails_fast(tmp_path, monkeypatch, capsys):
    proxy = "http://127.0.0.1:9"  # nothing listens on the discard port: every download is refused at once
    for variable in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(variable, proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    start = time.monotonic()
    fails_cleanly(capsys, ["fit", "--config", "mnist", "--data.root", str(tmp_path / "data"), "--data.download", "true",
                           "--trainer.default_root_dir", str(tmp_path / "run")],
                  f"cannot download the mnist data into '{tmp_path / 'data'}': Error downloading")
    assert time.monotonic() - start < 60
    nothing_to_trust(tmp_path)


@pytest.mark.slow
def test_diverging_run_stops_with_an_error_and_no_best_checkpoint(tmp_path, capsys):
    root = tmp_path / "run"
    code = main(["fit", "--trainer.default_root_dir", str(root), "--trainer.logger", "false", *QUIET,
                 "--trainer.max_epochs", "3", "--model.optimizer.init_args.lr", "1e12"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1].startswith("error: training diverged: the loss is nan at epoch 0")
    assert "best checkpoint" not in captured.out
    for path in root.rglob("*.ckpt"):  # whatever was saved before it diverged is finite and loads
        assert load_checkpoint(path).model is not None


@pytest.mark.parametrize("command", ["test", "validate"])
def test_evaluating_a_missing_checkpoint(command, tmp_path, capsys):
    fails_cleanly(capsys, [command, "--ckpt_path", str(tmp_path / "nope.ckpt")],
                  f"checkpoint not found: {tmp_path / 'nope.ckpt'}")


@pytest.mark.slow
def test_test_takes_the_checkpoints_data_and_root_override(checkpoint, tmp_path, capsys):
    code = main(["test", "--ckpt_path", str(checkpoint), "--trainer.logger", "false", *QUIET,
                 "--trainer.default_root_dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err[-2000:]
    fails_cleanly(capsys, ["test", "--ckpt_path", str(checkpoint), "--data.root", str(tmp_path),
                           "--trainer.default_root_dir", str(tmp_path)], "--data.root")


# ------------------------------------------------------------------------------------ broken models
def rewrite(checkpoint: Path, target: Path, edit, keep_digest=False) -> Path:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    edit(state["state_dict"])
    if not keep_digest:  # as if fit had saved these weights
        from lightning_idrs.digests import state_dict_sha256

        state[CHECKPOINT_KEY]["weights_sha256"] = state_dict_sha256(state["state_dict"])
    torch.save(state, target)
    return target


def all_nan(state_dict):
    for value in state_dict.values():
        if torch.is_tensor(value) and value.is_floating_point():
            value.fill_(float("nan"))


def nudge_one_weight(state_dict):
    name = next(k for k, v in state_dict.items() if k.startswith("model.net") and torch.is_tensor(v))
    state_dict[name].view(-1)[0] += 1.0


def test_nan_weights_are_never_certified(checkpoint, tmp_path, capsys):
    broken = rewrite(checkpoint, tmp_path / "nan.ckpt", all_nan)
    out = tmp_path / "out"
    fails_cleanly(capsys, ["certify", "--ckpt_path", str(broken), *SMALL, "--certify.out", str(out)],
                  f"{broken} has NaN or inf weights (")
    fails_cleanly(capsys, ["test", "--ckpt_path", str(broken), "--trainer.default_root_dir", str(tmp_path)],
                  f"{broken} has NaN or inf weights (")
    assert not out.exists()


def test_a_changed_weight_is_a_corrupt_checkpoint(checkpoint, tmp_path, capsys):
    changed = rewrite(checkpoint, tmp_path / "changed.ckpt", nudge_one_weight, keep_digest=True)
    fails_cleanly(capsys, ["certify", "--ckpt_path", str(changed), *SMALL, "--certify.out", str(tmp_path / "out")],
                  f"checkpoint is corrupt: the weights in {changed} differ from the digest recorded")
    flipped = tmp_path / "flipped.ckpt"  # the lowest bit of one float in every stored tensor flipped
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size >= 8:
                name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
                start = info.header_offset + 30 + name_length + extra_length  # the stored (uncompressed) bytes
                data[start + (info.file_size // 8) * 4] ^= 0x01
    flipped.write_bytes(bytes(data))
    fails_cleanly(capsys, ["certify", "--ckpt_path", str(flipped), *SMALL],
                  f"checkpoint is corrupt: the weights in {flipped} differ from the digest recorded")
    assert not (tmp_path / "out").exists()


def test_non_finite_logits_during_sampling_name_the_point():
    from torch import nn

    from lightning_idrs import CertifySettings, ConstantSigma, SmoothedClassifier, certify_chunks
    from lightning_idrs.sharding import plan_chunks
    from lightning_idrs.smoothing import BrokenModelError

    class NanOnBright(nn.Module):  # NaN logits for inputs whose first pixel is large
        def forward(self, x):
            logits = torch.stack([x.flatten(1).sum(1), -x.flatten(1).sum(1)], dim=1)
            return torch.where(x.flatten(1)[:, :1] > 5, float("nan"), logits)

    data = [(torch.zeros(1, 2, 2), 0) for _ in range(6)]
    data[4] = (torch.full((1, 2, 2), 10.0), 0)
    smoothed = SmoothedClassifier(NanOnBright(), ConstantSigma(0.1), num_classes=2)
    with pytest.raises(BrokenModelError, match=r"NaN or inf logits on noisy copies of data set point\(s\) \[4\]"):
        list(certify_chunks(smoothed, data, plan_chunks(np.arange(6), 3), CertifySettings(10, 50), "cpu"))


# ------------------------------------------------------------------------------------ hostile checkpoints
class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_checkpoint_with_a_pickle_payload_runs_nothing(checkpoint, tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, hostile)
    read = f"cannot read checkpoint {hostile}"
    fails_cleanly(capsys, ["certify", "--ckpt_path", str(hostile), *SMALL, "--certify.out", str(tmp_path / "o")], read)
    for command in ("test", "validate"):
        fails_cleanly(capsys, [command, "--ckpt_path", str(hostile), "--trainer.default_root_dir", str(tmp_path)], read)
    fails_cleanly(capsys, ["fit", "--ckpt_path", str(hostile), "--trainer.default_root_dir", str(tmp_path / "f")], read)
    with pytest.raises(UsageError, match=read):
        load_checkpoint(hostile)
    assert not marker.exists(), "a command ran code from the checkpoint"
    torch.load(hostile, weights_only=False)  # the payload is real: the unsafe unpickler runs it
    assert marker.exists()


# ------------------------------------------------------------------------------------ late checks
def test_certify_checks_compare_before_the_first_point(checkpoint, tmp_path, capsys):
    garbage = tmp_path / "garbage.tsv"
    garbage.write_bytes(b"\x00\x01 not a tsv\n")
    out = tmp_path / "out"
    fails_cleanly(capsys, ["certify", "--ckpt_path", str(checkpoint), *SMALL, "--certify.out", str(out),
                           "--certify.compare", str(garbage)],
                  f"--certify.compare {garbage} is not a certify.tsv of this version (header mismatch")
    fails_cleanly(capsys, ["certify", "--ckpt_path", str(checkpoint), *SMALL, "--certify.out", str(out),
                           "--certify.compare", str(tmp_path)],
                  f"--certify.compare {tmp_path} is not a certify.tsv of this version (the folder holds no certify.tsv)")
    assert not out.exists()


def test_summary_describes_exactly_the_selected_points(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["certify", "--ckpt_path", str(checkpoint), *SMALL, "--certify.out", str(out),
                 "--certify.max", "12"]) == 0
    assert main(["certify", "--ckpt_path", str(checkpoint), *SMALL, "--certify.out", str(out),
                 "--certify.max", "5"]) == 0
    summary = read_summary(out / SUMMARY_NAME)
    assert summary["max"] == summary["num_selected"] == summary["num_points"] == 5
    assert sum(summary["class_num_points"].values()) == 5
    assert len((out / TSV_NAME).read_text().splitlines()) == 13  # the other rows stay for a later rerun


# ------------------------------------------------------------------------------------ faults and files
@pytest.mark.slow
def test_fit_killed_and_resumed_from_last_keeps_sigma(tmp_path, caplog):
    root = tmp_path / "run"
    args = ["fit", "--trainer.default_root_dir", str(root), "--trainer.logger", "false", "--trainer.max_epochs", "4",
            *QUIET]
    stop = '{"class_path": "tests.helpers.HardStop", "init_args": {"after_epoch": 1}}'  # SIGKILL once epoch 1 is saved
    first = subprocess.run([sys.executable, "-m", "lightning_idrs", *args, "--trainer.callbacks+=" + stop], env=env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    last = root / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1
    with caplog.at_level("INFO"):
        assert main(args + ["--ckpt_path", "last"]) == 0  # resumed (in this process: the kill needed its own)
    resumed = caplog.text
    digest = [line.split("digest ")[1] for line in (first.stdout + first.stderr).splitlines()
              if "sigma(x) identical" in line]
    again = [line.split("digest ")[1] for line in resumed.splitlines() if "sigma(x) identical" in line]
    assert digest and digest == again
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 3 and "Restored all states" in resumed  # all 4 epochs


@pytest.mark.slow
def test_nothing_lands_in_home_and_online_logging_without_a_key_falls_back_to_offline(checkpoint, tmp_path):
    home, run = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    user = {k: v for k, v in env(HOME=str(home)).items() if k != "WANDB_API_KEY"}  # a new user: no key, empty HOME
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("fit", "certify")}
    start = time.monotonic()
    with logs["fit"], logs["certify"]:  # side by side, as two commands of one user can be
        fit = subprocess.Popen([sys.executable, "-m", "lightning_idrs", "fit", "--trainer.default_root_dir", str(run),
                                "--trainer.max_epochs", "1", *QUIET], env=user, stdout=logs["fit"], stderr=logs["fit"])
        certify = subprocess.Popen([sys.executable, "-m", "lightning_idrs", "certify", "--ckpt_path", str(checkpoint),
                                    "--certify.n0", "10", "--certify.n", "100", "--certify.max", "3",
                                    "--certify.out", str(run / "certify"), "--wandb.mode", "online"],
                                   env=user, stdout=logs["certify"], stderr=logs["certify"])
        codes = wait_all([fit, certify], timeout=300)
        output = {name: (log.seek(0), log.read())[1] for name, log in logs.items()}
    assert codes == [0, 0], output
    assert time.monotonic() - start < 60  # certify waited for no login and no server
    assert "warning: W&B cannot log online: no W&B API key" in output["certify"]
    assert (run / "certify" / SUMMARY_NAME).is_file()
    assert list((run / "wandb").glob("offline-run-*")) and list((run / "certify" / "wandb").glob("offline-run-*"))
    assert list(home.rglob("*")) == []  # no W&B log, cache or staging folder, no matplotlib cache


def test_wandb_online_problem_names_refused_keys_and_unreachable_servers(monkeypatch, tmp_path):
    import http.server
    import threading

    from lightning_idrs.wandb_logging import wandb_online_problem

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    try:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
        assert wandb_online_problem() == "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
        monkeypatch.setenv("WANDB_API_KEY", "bad-key")  # refused before any request: W&B keys have 40+ characters
        assert wandb_online_problem().startswith("the W&B API key is not valid (API key must have 40+ characters")
        monkeypatch.delenv("WANDB_API_KEY")  # a well-formed key from .netrc (wandb's own reader), refused: HTTP 401
        netrc.write_text(f"machine 127.0.0.1:{server.server_port}\n  login user\n  password {'k' * 40}\n")
        assert wandb_online_problem().startswith("the W&B server refused the API key (")  # wandb's words vary
    finally:
        server.shutdown()
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    start = time.monotonic()
    assert wandb_online_problem().startswith("cannot reach 127.0.0.1:9")
    assert time.monotonic() - start < 30


BAD_FITS = {  # an option jsonargparse refuses, and a model that does not fit the data (found after loading it)
    "r < 0": (["--model.sigma.semi_elasticity", "-1"],
              "error: --model.sigma.semi_elasticity must be a finite number >= 0"),
    "k too large": (["--model.sigma.k", "5000"], "error: the model and the data do not fit together: k must be smaller"),
}


@pytest.mark.slow
def test_a_bad_fit_prints_exactly_one_line(tmp_path):
    """As a user sees it, in a process of its own (nothing else printed: no held-back Lightning message, no
    warning). The two commands run side by side."""
    processes = {case: subprocess.Popen([sys.executable, "-m", "lightning_idrs", "fit", "--trainer.default_root_dir",
                                         str(tmp_path / f"run{i}"), *flags], env=env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                 for i, (case, (flags, _)) in enumerate(BAD_FITS.items())}
    for case, process in processes.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 2, (case, err)
        assert err.splitlines() == [err.strip()] and err.startswith(BAD_FITS[case][1]), (case, err)
        assert out == "", (case, out)
    nothing_to_trust(tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--certify.split", "bogus"], "--certify.split must be one of test, val, train, got bogus"),
    (["--wandb.mode", "maybe"], "--wandb.mode must be one of offline, online, disabled, got maybe"),
    (["--certify.n0", "2.5"], "--certify.n0 must be an integer >= 1, got 2.5"),
    (["--certify.radii_step", "0"], "--certify.radii_step must be a finite number > 0, got 0"),
    (["--certify.channels_last", "maybe"], "--certify.channels_last must be true or false, got maybe"),
    (["--certify.sequential", "3"], "--certify.sequential must be true or false, got 3"),
    (["--config", "missing.yaml"], "--config: no such file: missing.yaml"),
])
def test_certify_bad_options(flags, message, checkpoint, tmp_path, capsys):
    fails_cleanly(capsys, ["certify", "--ckpt_path", str(checkpoint), *SMALL, "--certify.out", str(tmp_path / "o"),
                           *flags], message)
    assert not (tmp_path / "o").exists()
