"""What several test modules share (no test module imports another): paths and environments for
subprocesses, the small certify settings, row comparison, launcher environments and SLURM-style tasks,
waiting for processes started side by side, a callback that kills a fit at an exact point, fake data
sets, a model that cannot run channels-last, and offline W&B runs read as W&B reads them (records, config,
history, metric definitions, artifacts)."""
import base64
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pytorch_lightning import Callback
from torch import nn
from wandb.proto import wandb_internal_pb2

from lightning_idrs.tsv_log import TSV_HEADER, TSV_NAME, read_tsv

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), WANDB_SILENT="true")  # a subprocess runs this checkout
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMALL = ["--certify.n0", "10", "--certify.n", "200", "--wandb.mode", "disabled"]
TWO_RANKS = ["--certify.devices", "2", "--certify.accelerator", "cpu"]
ROWS = [name for name in TSV_HEADER if name != "time"]  # the time column is wall time, never reproducible
#: sigma1/sigma0 lower thresholds of the paper's Table 1 for pB = 0.1, 0.01, 0.001, 0.00007
PAPER_TABLE = {
    784: [0.946, 0.924, 0.908, 0.892],
    3072: [0.973, 0.961, 0.953, 0.945],
    196608: [0.997, 0.995, 0.994, 0.993],
}
N_TRAIN, N_TEST = 60, 20  # the fake MNIST / CIFAR-10 files


def env(**extra) -> dict:
    return dict(ENV, **extra)


def same_rows(a, b) -> bool:
    """The certify.tsv of folders ``a`` and ``b`` agree in every column but time."""
    ta, tb = read_tsv(Path(a) / TSV_NAME), read_tsv(Path(b) / TSV_NAME)
    return all(np.array_equal(ta[k], tb[k]) for k in ROWS)


def slurm_env(rank, tasks=2, per_node=2, port="29500") -> dict:
    """What srun gives task ``rank`` of a one-node job (MASTER_ADDR spares resolving a node list)."""
    return {"SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_JOB_NAME": "certify", "SLURM_JOB_ID": "4242",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}


def _unused_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run_slurm_tasks(argvs, cwd, ports=None, timeout=300) -> list:
    """Run ``python -m lightning_idrs ARGV`` once per rank, as srun starts the tasks of a one-node job
    (``argvs[rank]``); returns ``[(stdout, stderr, returncode)]`` per rank.

    Rank 0 binds MASTER_PORT for the job's rendezvous, as on a cluster. Only binding a port holds it, so
    the port handed to the tasks was free a moment before, and another process may take it before rank 0
    binds it: then rank 0 stops at once with "address already in use" and the job is started again on
    another port (``ports``: the ports to try; default: three that were unused). Every other outcome is
    returned as it is. The output goes to files: a task blocked on a full pipe would stall the collectives.
    """
    for port in ports if ports is not None else (_unused_port() for _ in range(3)):
        with tempfile.TemporaryDirectory() as logs:
            files = [(Path(logs) / f"{rank}.out", Path(logs) / f"{rank}.err") for rank in range(len(argvs))]
            tasks = []
            try:
                for rank, (argv, (out, err)) in enumerate(zip(argvs, files)):
                    with open(out, "wb") as stdout, open(err, "wb") as stderr:
                        tasks.append(subprocess.Popen(
                            [sys.executable, "-m", "lightning_idrs", *argv], cwd=cwd, stdout=stdout, stderr=stderr,
                            env=dict(ENV, **slurm_env(rank, tasks=len(argvs), port=str(port)))))
                tasks[0].wait(timeout=timeout)
                taken = tasks[0].returncode == 2 and "address already in use" in files[0][1].read_text()
                for task in tasks[1:]:
                    if taken:  # it would wait for rank 0's store until its timeout
                        task.kill()
                    task.wait(timeout=timeout)
            finally:  # a timeout: leave no task behind
                for task in tasks:
                    if task.poll() is None:
                        task.kill()
                        task.wait()
            if not taken:
                return [(out.read_text(), err.read_text(), task.returncode) for task, (out, err) in zip(tasks, files)]
    raise AssertionError("every port tried for MASTER_PORT was taken by another process")


def wait_all(processes, timeout: float) -> list:
    """Wait for each process (up to ``timeout`` s each) and return their exit codes; on a timeout (or any
    error) none is left running."""
    try:
        return [process.wait(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


class HardStop(Callback):
    """SIGKILLs its own process when epoch ``after_epoch`` + 1 starts, i.e. right after every hook of epoch
    ``after_epoch``: its last.ckpt is complete on disk (ModelCheckpoint saves in on_train_epoch_end when
    validation runs every epoch; on_train_epoch_start of the next epoch comes after it). A fit killed at an
    exact point: ``--trainer.callbacks+={"class_path": "tests.helpers.HardStop", "init_args": {...}}``."""

    def __init__(self, after_epoch: int):
        self.after_epoch = after_epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > self.after_epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as torchvision's MNIST reads it."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def fake_images(n: int, shape: tuple, offset: int) -> np.ndarray:
    """Random uint8 images whose first pixel is a unique image id."""
    rng = np.random.default_rng(offset)
    x = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
    x.reshape(n, -1)[:, 0] = np.arange(offset, offset + n)
    x.reshape(n, -1)[:, 1] = 255
    return x


class ViewCNN(nn.Module):
    """conv -> ``.view`` of the feature map: a pattern (in users' models) that channels-last weights break."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        c, h, w = input_shape
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.fc = nn.Linear(4 * h * w, num_classes)

    def forward(self, x):
        features = self.conv(x)
        return self.fc(features.view(features.shape[0], -1))


class ConstantNet(nn.Module):
    """Logits that ignore the input (a linear layer of it times 0, plus a bias favouring class 0): a smoothed
    classifier that is certain everywhere, so its radii are as large as n and alpha allow (sigma Phi^-1(...))."""

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        self.fc = nn.Linear(int(np.prod(input_shape)), num_classes)
        self.register_buffer("prior", torch.arange(num_classes, 0, -1, dtype=torch.float32))

    def forward(self, x):
        return 0.0 * self.fc(x.flatten(1)) + self.prior


def records(path):
    """The records of a W&B transaction log (LevelDB log format: 32 KiB blocks of CRC, length, type, data)."""
    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # W&B's service is still writing this record: the file ends here for now
            return
        parts = (parts if kind in (3, 4) else b"") + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def finished_run_records(folder: Path, wait: float = 60.0) -> list:
    """The records of an offline W&B run folder, once W&B's service has written the last one (it flushes
    the file after ``finish`` returns, and a loaded machine can take seconds)."""
    deadline = time.monotonic() + wait
    while True:
        found = [r for f in sorted(Path(folder).glob("*.wandb")) for r in records(f)]
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def differing_rows(a, b) -> int:
    """How many rows of two runs over the same points differ; fails unless each difference is one that float
    rounding can make: the same point and label, and a lower bound on pA within a few samples' worth."""
    assert np.array_equal(a.rows["idx"], b.rows["idx"]) and np.array_equal(a.rows["label"], b.rows["label"])
    differ = np.zeros(len(a.rows["idx"]), dtype=bool)
    for key in ROWS:
        differ |= a.rows[key] != b.rows[key]
    same_prediction = a.rows["predict"] == b.rows["predict"]
    gap = np.abs(a.rows["p_a_lower"] - b.rows["p_a_lower"])
    assert np.all(gap[differ & same_prediction] <= 0.05), gap[differ]
    return int(differ.sum())


# ------------------------------------------------------------------------------ offline W&B runs, as W&B reads them
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


class WandbRun:
    """One offline run folder, as records by kind: run, config, summary, history rows, metric definitions,
    artifacts."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.records = finished_run_records(self.folder)
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

    def logged(self, key):
        return [step for step in self.history if any(k == key or k.startswith(key + "/") for k in step)]

    def table(self, step: dict, key: str) -> dict:
        return json.loads((self.folder / "files" / step[f"{key}/path"]).read_text())

    def history_keys(self) -> set:
        """The keys of the history rows as W&B shows them (a table's or image's nested fields are its own)."""
        return {i.nested_key[0] if i.nested_key else i.key for r in self.records
                if r.WhichOneof("record_type") == "history" for i in r.history.item}

    def definitions(self, key: str) -> list:
        """The metric definitions that match ``key``: by name, or a glob ``PREFIX*`` by prefix (W&B's rule)."""
        found = []
        for m in self.metrics:
            if m.glob_name:
                if key.startswith(m.glob_name.rstrip("*")):
                    found.append((m.glob_name, m.step_metric))
            elif m.name.replace("\\.", ".") == key:
                found.append((m.name, m.step_metric))
        return found


def wandb_runs(folder) -> list:
    """The offline runs under ``folder``/wandb, oldest first."""
    return [WandbRun(path) for path in sorted(Path(folder).glob("wandb/offline-run-*"))]


def md5_b64(path) -> str:
    """A file's digest as W&B's artifact manifests write it (base64 of the MD5)."""
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()
