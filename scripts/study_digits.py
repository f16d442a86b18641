"""RS vs IDRS on the embedded digits data: train, certify, and write docs/results/digits.md.

    python scripts/study_digits.py                       # the study (about 25 minutes on 2 CPU cores)
    python scripts/study_digits.py --quick               # a smoke run: 2 epochs, n = 1,000, 30 points

Every setting trains with `python -m lightning_idrs fit` and certifies with `python -m lightning_idrs
certify` (n = 100,000, alpha = 0.001) into OUT/<setting>/. Rerunning resumes: finished fits and
certified points are kept. Settings: sigma_b in {0.12, 0.25, 0.5} x r in {0 (RS), 0.01, 0.05, 0.1,
0.2} with k = 20; a k sweep at the best r; and two other r-semi-elastic sigma designs (kNN distance
in a PCA embedding, distance to the k-th neighbour), each certified with its own semi-elasticity.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
GRID = [0.0, 0.25, 0.5, 0.75, 1.0]
SIGMA_B = (0.12, 0.25, 0.5)
R_VALUES = (0.01, 0.05, 0.1, 0.2)
CALLBACKS = json.dumps([{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                         "init_args": {"monitor": "val/noisy_acc", "mode": "max", "filename": "best-{epoch:02d}"}}])


def setting(name, sigma_base, r=0.0, k=20, extra=(), design="paper"):
    flags = ["--model.sigma.sigma_base", str(sigma_base)]
    if r == 0.0:
        flags = ["--config", "rs", *flags]
    else:
        flags += ["--model.sigma.semi_elasticity", str(r), "--model.sigma.k", str(k), *extra]
    return {"name": name, "sigma_base": sigma_base, "r": r, "k": k, "design": design, "flags": flags}


def main_grid():
    out = []
    for sigma_base in SIGMA_B:
        out.append(setting(f"sb{sigma_base}_rs", sigma_base))
        out += [setting(f"sb{sigma_base}_r{r}", sigma_base, r) for r in R_VALUES]
    return out


def run(command, log: Path, env):
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(command)}\n")
        fh.flush()
        subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, check=True, env=env, cwd=REPO)


def fit_and_certify(spec, args, env):
    folder = args.out / spec["name"]
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "checkpoint.txt"
    python = [sys.executable, "-m", "lightning_idrs"]
    if not done.is_file():
        run([*python, "fit", "--config", "digits", *spec["flags"], "--model.arch", args.arch, "--trainer.logger",
             "false", "--trainer.max_epochs", str(args.epochs), "--trainer.enable_progress_bar", "false",
             "--trainer.default_root_dir", str(folder / "fit"), f"--trainer.callbacks={CALLBACKS}"],
            folder / "fit.log", env)
        best = sorted((folder / "fit" / "checkpoints").glob("best-*.ckpt"))[-1]
        done.write_text(str(best))
    run([*python, "certify", "--ckpt_path", done.read_text(), "--certify.n", str(args.n), "--certify.skip",
         str(args.skip), "--certify.max", str(args.points), "--certify.out", str(folder / "certify"),
         "--certify.radii", "[0.0,0.25,0.5,0.75,1.0]", "--wandb.mode", "disabled"], folder / "certify.log", env)
    from lightning_idrs.reporting import read_summary
    from lightning_idrs.tsv_log import read_tsv

    return read_summary(folder / "certify" / "summary.json"), read_tsv(folder / "certify" / "certify.tsv")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study_digits")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--skip", type=int, default=1, help="certify every skip-th test point")
    parser.add_argument("--points", type=int, default=360)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--quick", action="store_true", help="2 epochs, n = 1,000, 30 points (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.points, args.epochs, args.skip = 1000, 30, 2, 3
    env = dict(os.environ, WANDB_SILENT="true", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    results = {}
    for spec in main_grid():
        results[spec["name"]] = (spec, *fit_and_certify(spec, args, env))
        print(f"{spec['name']}: ACR {results[spec['name']][1]['acr']:.4f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    best_r = max(R_VALUES, key=lambda r: results[f"sb0.25_r{r}"][1]["acr"])
    extra = [setting(f"sb0.25_r{best_r}_k{k}", 0.25, best_r, k) for k in (5, 50)]
    extra += [setting(f"sb0.25_r{best_r}_pca16", 0.25, best_r, 20,
                      ("--model.sigma.embedding", "PCAProjection", "--model.sigma.embedding.dim", "16"),
                      "kNN mean in a 16-d PCA embedding"),
              setting(f"sb0.25_r{best_r}_kth", 0.25, best_r, 20, ("--model.sigma.statistic", "kth"),
                      "distance to the k-th neighbour")]
    for spec in extra:
        results[spec["name"]] = (spec, *fit_and_certify(spec, args, env))
        print(f"{spec['name']}: ACR {results[spec['name']][1]['acr']:.4f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    from study_report import write_report

    write_report(results, best_r, args, time.perf_counter() - start)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
