"""Packaging as a user meets it: the sdist builds, a wheel is built from it, and the package installed
from the sdist (and by ``pip install .`` / ``pip install -e .``) runs ``fit`` on the digits.

Offline and fast: every install is ``--no-deps --no-build-isolation`` into a fresh virtual environment
that sees this environment's packages (torch, faiss, setuptools, pip...) through a ``.pth`` file. (A
``--system-site-packages`` venv would not do: when the tests run inside a venv, as in CI, it sees the
base interpreter's packages, not this environment's.) What the new environment imports as
``lightning_idrs`` is checked to be the installed copy, never this checkout.
"""
import email
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import lightning_idrs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
VERSION = lightning_idrs.__version__
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                   ".pytest_cache", "runs", "wandb", "lightning_logs", "*.ckpt")
RUNTIME = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "jsonargparse", "numpy", "scipy",
           "scikit-learn", "matplotlib", "wandb", "tqdm", "pyyaml", "filelock", "mlxtend")


def run(args, **kwargs):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A copy of the source tree, and the sdist and wheel ``python -m build`` makes of it (wheel from sdist)."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", root / "dist", source])
    sdist, = (root / "dist").glob("*.tar.gz")
    wheel, = (root / "dist").glob("*.whl")
    return root, source, sdist, wheel


def fresh_env(folder: Path, home: Path):
    """A new venv whose Python also sees this environment's packages; returns (its bin folder, env vars)."""
    run([sys.executable, "-m", "venv", "--without-pip", folder])
    bin_dir = folder / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "outer_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HOME=str(home), WANDB_SILENT="true", PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return bin_dir, env


def pip_install(bin_dir, env, cwd, *what):
    """pip (and the build backend's plugins, e.g. a Rust toolchain probe) get a HOME of their own: the HOME
    checked to stay empty is the one of the installed program."""
    pip_home = Path(env["HOME"]).with_name(Path(env["HOME"]).name + "-pip")
    pip_home.mkdir(exist_ok=True)
    run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed",
         "--no-index", *what], env=dict(env, HOME=str(pip_home)), cwd=cwd)


def where_imported(bin_dir, env, cwd) -> Path:
    out = run([bin_dir / "python", "-c", "import lightning_idrs; print(lightning_idrs.__file__, "
               "lightning_idrs.__version__)"], env=env, cwd=cwd).stdout.split()
    assert out[1] == VERSION
    return Path(out[0]).resolve()


def test_sdist_and_wheel_carry_the_package_its_data_and_its_metadata(work):
    _, _, sdist, wheel = work
    assert sdist.name == f"lightning_idrs-{VERSION}.tar.gz" and wheel.name == f"lightning_idrs-{VERSION}-py3-none-any.whl"
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    assert {"pyproject.toml", "LICENSE", "README.md", "lightning_idrs/py.typed", "lightning_idrs/configs/digits.yaml",
            "lightning_idrs/configs/rs.yaml", "tests/test_packaging.py"} <= names
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        meta = email.message_from_bytes(archive.read(f"lightning_idrs-{VERSION}.dist-info/METADATA"))
        scripts = archive.read(f"lightning_idrs-{VERSION}.dist-info/entry_points.txt").decode()
    assert {"lightning_idrs/py.typed", "lightning_idrs/configs/cifar10.yaml", "lightning_idrs/configs/mnist.yaml",
            "lightning_idrs/commands/doctor.py", f"lightning_idrs-{VERSION}.dist-info/licenses/LICENSE"} <= files
    assert not any(name.startswith("tests/") for name in files)
    assert "lightning-idrs = lightning_idrs.commands:main" in scripts
    assert meta["Version"] == VERSION and meta["License-Expression"] == "MIT" and meta["Requires-Python"] == ">=3.10"
    assert any(url.startswith("Source, https://github.com/") for url in meta.get_all("Project-URL"))
    assert "Programming Language :: Python :: 3.13" in meta.get_all("Classifier")
    requires = meta.get_all("Requires-Dist")
    base = {r.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in requires if "extra ==" not in r}
    assert base == set(RUNTIME)  # tensorboard is not required; faiss comes from an extra
    bounded = [r for r in requires if not r.startswith("lightning_idrs[")]  # [dev] names the other extras
    assert all("<" in r and ">=" in r for r in bounded), requires  # lower and upper bounds everywhere
    extras = {r.split("extra == ")[1].strip("'\"") for r in requires if "extra ==" in r}
    assert extras == {"cpu", "gpu", "tensorboard", "wandb", "test", "dev"} == set(meta.get_all("Provides-Extra"))
    faiss = [r for r in requires if r.startswith("faiss")]
    assert len(faiss) == 2 and all("extra ==" in r for r in faiss)  # one wheel per extra, never both at once


def test_the_sdist_installs_into_a_fresh_environment_and_fits_the_digits(work):
    root, _, sdist, _ = work
    bin_dir, env = fresh_env(root / "venv-sdist", root / "home-sdist")
    cwd = root / "run"
    cwd.mkdir()
    pip_install(bin_dir, env, cwd, sdist)  # pip builds a wheel from the sdist and installs it
    assert (root / "venv-sdist") in where_imported(bin_dir, env, cwd).parents
    result = run([bin_dir / "lightning-idrs", "fit", "--trainer.max_epochs", "1", "--trainer.logger", "false",
                  "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"], env=env, cwd=cwd)
    best = Path([line for line in result.stdout.splitlines() if line.startswith("best checkpoint: ")][-1].split(": ", 1)[1])
    assert best.is_file() and cwd in best.parents


def test_pip_install_dot_and_editable_work_from_the_source_tree(work):
    root, source, _, _ = work
    for mode, args in (("regular", [str(source)]), ("editable", ["-e", str(source)])):
        bin_dir, env = fresh_env(root / f"venv-{mode}", root / f"home-{mode}")
        pip_install(bin_dir, env, root, *args)
        module = where_imported(bin_dir, env, root)
        expected = source if mode == "editable" else root / f"venv-{mode}"
        assert expected in module.parents, (mode, module)
        assert (module.parent / "configs" / "digits.yaml").is_file() and (module.parent / "py.typed").is_file()
        out = run([bin_dir / "lightning-idrs", "thresholds", "--dim", "784", "--p-b", "0.1"], env=env, cwd=root).stdout
        assert "N=784" in out
        out = run([bin_dir / "lightning-idrs", "--help"], env=env, cwd=root).stdout
        assert "doctor" in out and "certify" in out
