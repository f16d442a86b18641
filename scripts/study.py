"""RS vs IDRS x training objective x seeds on one data set: train, certify, and write docs/results/<config>.md.

    python scripts/study.py --config mnist5k          # docs/results/mnist5k.md (the settings it records)
    python scripts/study.py --config digits           # docs/results/digits.md
    python scripts/study.py --config mnist5k --report-only    # rewrite the report from the finished runs

Every run trains with `python -m lightning_idrs fit --config <config>` (seed = --seeds; the data split
stays the data module's default, so every run is certified on the same test points) and certifies with
`python -m lightning_idrs certify --certify.sequential true` on the grid R = 0, 0.25, ..., 2.0 at
alpha = 0.001 into OUT/<run>/. Settings: sigma_b x (RS, IDRS at each r) x objective x seed. Rerunning
resumes: finished fits and certified points are kept, and a run's certification is skipped once it is
complete. All runs log to one W&B group (offline by default; --wandb disabled to skip W&B).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = [0.25 * i for i in range(9)]  # 0, 0.25, ..., 2.0
#: IDRS semi-elasticities: the digits study's best two by ACR (0.01, 0.05; 0.01 is also the r of the paper's
#: MNIST / CIFAR-10 grid in scripts/reproduce_*.sh) and configs/mnist.yaml's / mnist5k.yaml's r (0.02).
R_VALUES = (0.01, 0.02, 0.05)
OBJECTIVES = {"gaussian": "GaussianAugmentation", "consistency": "ConsistencyRegularization"}
#: Per data set: sigma_b values, r values, base model, epochs, every skip-th test point, n (sequential: at most).
#: mnist5k: sized to about 100 minutes on 2 CPU cores (docs/results/mnist5k.md says what was run and why);
#: the MLP because LeNet's forward pass costs 4x more per noisy sample here (245 vs 60 us).
DATASETS = {
    "digits": {"sigma_b": (0.25, 0.5), "arch": "mlp", "epochs": 30, "skip": 1, "n": 100_000, "r": R_VALUES},
    "mnist5k": {"sigma_b": (0.25, 0.5, 1.0), "arch": "mlp", "epochs": 10, "skip": 10, "n": 10_000, "r": R_VALUES},
}
CALLBACKS = json.dumps([{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                         "init_args": {"monitor": "val/noisy_acc", "mode": "max", "filename": "best-{epoch:02d}"}}])


def run_name(sigma_base, r, objective, seed) -> str:
    return f"sb{sigma_base:g}_{'rs' if r == 0 else f'r{r:g}'}_{objective}_s{seed}"


def settings(args) -> list:
    """Every run, grouped so that a study cut short has whole sigma_b blocks with every seed."""
    out = []
    for sigma_base in args.sigma_b:
        for seed in args.seeds:
            for r in (0.0, *args.r):
                for objective in args.objectives:
                    out.append({"name": run_name(sigma_base, r, objective, seed), "sigma_base": sigma_base, "r": r,
                                "objective": objective, "seed": seed})
    return out


def fit_command(spec, args, folder: Path) -> list:
    flags = ["--config", args.config]
    if spec["r"] == 0:
        flags += ["--config", "rs", "--model.sigma.sigma_base", f"{spec['sigma_base']:g}"]
    else:
        flags += ["--model.sigma.sigma_base", f"{spec['sigma_base']:g}", "--model.sigma.semi_elasticity",
                  f"{spec['r']:g}"]
    if args.wandb == "offline":
        logger = ["--trainer.logger.init_args.save_dir", str(folder / "fit"), "--trainer.logger.init_args.group",
                  args.group, "--trainer.logger.init_args.name", spec["name"]]
    else:
        logger = ["--trainer.logger", "false"]
    return [sys.executable, "-m", "lightning_idrs", "fit", *flags, "--model.objective", OBJECTIVES[spec["objective"]],
            "--model.arch", args.arch, "--seed_everything", str(spec["seed"]), "--trainer.max_epochs", str(args.epochs),
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(folder / "fit"),
            f"--trainer.callbacks={CALLBACKS}", *logger]


def certify_command(checkpoint: str, args, folder: Path) -> list:
    command = [sys.executable, "-m", "lightning_idrs", "certify", "--ckpt_path", checkpoint, "--certify.sequential",
               "true", "--certify.radii", json.dumps(GRID), "--certify.n", str(args.n), "--certify.alpha", "0.001",
               "--certify.skip", str(args.skip), "--certify.out", str(folder / "certify"), "--wandb.mode", args.wandb]
    if args.max:
        command += ["--certify.max", str(args.max)]
    if args.wandb != "disabled":
        command += ["--wandb.group", args.group]
    return command


def _run(command, log: Path, env) -> str:
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(command)}\n")
        fh.flush()
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=fh, text=True, env=env, cwd=REPO)
        fh.write(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}, see {log}")
    return result.stdout


def fit_and_certify(spec, args, env) -> dict:
    """Train (unless done) and certify (unless complete) one run; returns its timing record."""
    folder = args.out / spec["name"]
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "run.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"spec": spec}
    if "checkpoint" not in record:
        start = time.perf_counter()
        output = _run(fit_command(spec, args, folder), folder / "fit.log", env)
        record["checkpoint"] = output.split("best checkpoint: ")[-1].strip()
        record["fit_s"] = time.perf_counter() - start
        record_path.write_text(json.dumps(record, indent=1))
    command = certify_command(record["checkpoint"], args, folder)
    if record.get("certified") != command[4:]:
        start = time.perf_counter()
        _run(command, folder / "certify.log", env)
        record["certified"], record["certify_s"] = command[4:], time.perf_counter() - start
        record_path.write_text(json.dumps(record, indent=1))
    return record


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(DATASETS), required=True)
    parser.add_argument("--out", type=Path, help="run folders (default runs/study_<config>)")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "results", help="where <config>.md goes")
    parser.add_argument("--sigma-b", type=float, nargs="+", help="sigma_b values (default: per data set)")
    parser.add_argument("--r", type=float, nargs="+", help=f"IDRS semi-elasticities (default {R_VALUES})")
    parser.add_argument("--objectives", nargs="+", choices=sorted(OBJECTIVES), default=sorted(OBJECTIVES)[::-1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--skip", type=int, help="certify every skip-th test point")
    parser.add_argument("--max", type=int, help="certify at most this many points")
    parser.add_argument("--n", type=int, help="estimation samples per point (sequential: at most)")
    parser.add_argument("--arch", help="base model (default: per data set)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (threads are shared out)")
    parser.add_argument("--wandb", choices=("offline", "disabled"), default="offline")
    parser.add_argument("--group", help="W&B group of every run (default study-<config>)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    args = parser.parse_args(argv)
    for key, value in DATASETS[args.config].items():
        if getattr(args, key.replace("-", "_"), None) is None:
            setattr(args, key, value)
    args.out = args.out or REPO / "runs" / f"study_{args.config}"
    args.group = args.group or f"study-{args.config}"
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    record = args.out / "study.json"  # the command of the runs, quoted by the report
    if args.report_only and record.is_file():  # the report covers the settings the runs were made with
        args = parse([*json.loads(record.read_text())["flags"], "--out", str(args.out), "--report", str(args.report),
                      "--report-only"])
    if not args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)
        kept = ("--out", "--report")
        flags = [a for i, a in enumerate(argv) if a not in kept and (i == 0 or argv[i - 1] not in kept)]
        record.write_text(json.dumps({"flags": flags}))
    args.command_flags = " ".join(json.loads(record.read_text())["flags"]) if record.is_file() else f"--config {args.config}"
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, WANDB_SILENT="true", WANDB_RUN_GROUP=args.group, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    specs = settings(args)
    failed = []
    if not args.report_only:
        start = time.perf_counter()

        def one(spec):
            try:
                record = fit_and_certify(spec, args, env)
            except RuntimeError as error:
                failed.append(spec["name"])
                print(f"{spec['name']}: failed ({error})", flush=True)
                return
            print(f"{spec['name']}: fit {record.get('fit_s', 0):.0f} s, certify {record.get('certify_s', 0):.0f} s "
                  f"({time.perf_counter() - start:.0f} s so far)", flush=True)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, specs))
    from study_report import write_report

    write_report(args, specs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]
    sys.exit(main())
