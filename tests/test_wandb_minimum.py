"""The oldest wandb that pyproject.toml accepts, installed and used: fit and certify offline, and the online check
with its fallback (which must use only public W&B calls: the private modules move between releases)."""
import http.server
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import QUIET, REPO, env, wandb_runs

pytestmark = pytest.mark.slow


def declared_minimum() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"wandb>=([0-9.]+),', text).group(1)


@pytest.fixture(scope="module")
def oldest_wandb(request):
    """A folder holding the declared minimum of wandb and its dependencies (kept in pytest's cache)."""
    version = declared_minimum()
    folder = Path(request.config.cache.mkdir(f"wandb-{version}"))
    if not (folder / "wandb" / "__init__.py").is_file():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--target", str(folder), f"wandb=={version}"], capture_output=True, text=True)
        assert done.returncode == 0, f"cannot install wandb=={version} from the package index: {done.stderr[-2000:]}"
    return version, dict(env(WANDB_SILENT="true"), PYTHONPATH=f"{folder}:{REPO}")


def run(args, environment, cwd):
    return subprocess.run([sys.executable, *args], env=environment, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def fitted(oldest_wandb, tmp_path_factory):
    version, environment = oldest_wandb
    folder = tmp_path_factory.mktemp("oldest_wandb")
    said = run(["-c", "import wandb; print(wandb.__version__)"], environment, folder)
    assert said.stdout.strip() == version, said.stderr[-2000:]
    fit = run(["-m", "lightning_idrs", "fit", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
               "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", "run", *QUIET], environment, folder)
    assert fit.returncode == 0, fit.stderr[-3000:]
    return folder, re.search(r"best checkpoint: (\S+)", fit.stdout).group(1)


def test_fit_and_certify_log_offline_with_the_oldest_wandb(oldest_wandb, fitted):
    _, environment = oldest_wandb
    folder, checkpoint = fitted
    (trained,) = wandb_runs(folder / "run")
    assert trained.run.display_name == "digits-IDRS-sb0.25-r0.2-seed0"
    assert {a.type for a in trained.artifacts} >= {"model"} and trained.logged("monitor/acr")
    certify = run(["-m", "lightning_idrs", "certify", "--ckpt_path", checkpoint, "--certify.n0", "10",
                   "--certify.n", "100", "--certify.max", "5", "--certify.out", "certify"], environment, folder)
    assert certify.returncode == 0, certify.stderr[-3000:]
    assert "warning: W&B logging failed" not in certify.stderr
    (certified,) = wandb_runs(folder / "certify")
    assert {a.type for a in certified.artifacts} >= {"model", "certify-results"}
    assert certified.summary["certify/num_points"] == 5


def test_the_online_check_and_its_fallback_with_the_oldest_wandb(oldest_wandb, fitted, tmp_path):
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    _, environment = oldest_wandb
    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1:{server.server_port}\n  login user\n  password {'k' * 40}\n")
    check = "from lightning_idrs.wandb_logging import wandb_online_problem; print(wandb_online_problem())"
    base = {k: v for k, v in environment.items() if k != "WANDB_API_KEY"}
    try:
        cases = {  # environment -> the line's start
            "no key": (dict(base, NETRC=str(tmp_path / "none"), WANDB_BASE_URL="http://127.0.0.1:9"), "no W&B API key"),
            "bad key": (dict(base, WANDB_API_KEY="bad-key"), "the W&B API key is not valid"),
            "refused": (dict(base, NETRC=str(netrc), WANDB_BASE_URL=f"http://127.0.0.1:{server.server_port}"),
                        "the W&B server refused the API key"),
            "unreachable": (dict(base, WANDB_API_KEY="k" * 40, WANDB_BASE_URL="http://127.0.0.1:9"),
                            "cannot reach 127.0.0.1:9"),
        }
        for name, (environment_, start) in cases.items():
            said = run(["-c", check], environment_, tmp_path)
            assert said.returncode == 0 and said.stdout.startswith(start), (name, said.stdout, said.stderr[-2000:])
    finally:
        server.shutdown()
    folder, checkpoint = fitted
    fallback = run(["-m", "lightning_idrs", "certify", "--ckpt_path", checkpoint, "--certify.n0", "10", "--certify.n",
                    "100", "--certify.max", "3", "--certify.out", "online", "--wandb.mode", "online"],
                   cases["no key"][0], folder)
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "warning: W&B cannot log online: no W&B API key" in fallback.stderr
    assert len(wandb_runs(folder / "online")) == 1, "logged offline instead"
