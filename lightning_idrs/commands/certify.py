"""``python -m lightning_idrs certify``: certify a trained checkpoint on a data split (Cohen et al., CERTIFY).

    python -m lightning_idrs certify --ckpt_path CKPT [--config CFG] [--data.root DIR]
        [--certify.n0 100] [--certify.n 100000] [--certify.alpha 0.001] [--certify.batch_size 1000]
        [--certify.split test] [--certify.skip 1] [--certify.max N] [--certify.out DIR]
        [--certify.compare OTHER/certify.tsv] [--wandb.mode offline|online|disabled]

Data and model settings come from the checkpoint (:mod:`lightning_idrs.checkpoint`); ``--config``
(e.g. a fit config) may override the data (its ``data:`` section) and set defaults for the
``certify:`` options; ``--data.root`` overrides only the data root. The output directory receives
``certify.tsv`` (one row per point, appended and fsync'ed chunk by chunk), ``summary.json``,
``certified_accuracy.png`` and the W&B run folder.

Reproducibility: the selected points (every ``skip``-th, at most ``max``) are cut into fixed chunks
of ``points_per_chunk`` consecutive points; chunk c is certified with noise seeded from (seed, c)
(:func:`lightning_idrs.smoothing.certify_chunks`). A rerun into the same directory recomputes only
unfinished chunks and appends only the missing rows, so an interrupted and resumed run gives the
same rows (but the ``time`` column) as an uninterrupted one on the same device. Everything that
changes the rows is stored in ``settings.json`` and checked on a rerun; ``max`` and the device are
not, so a run can be extended or moved. ``summary.json`` and the plot describe exactly the selected
points. (Extending ``max`` past a final *partial* chunk recomputes that chunk in full: its earlier
rows stay, the new rows come from the full chunk's noise.)
"""

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from lightning_idrs.reporting import ReportOptions
from lightning_idrs.smoothing import CertifySettings
from lightning_idrs.validation import PositiveInt, UsageError, one_line

NOISE_SCHEME = "chunk-seeded-v1"  # how noise is derived from (seed, chunk); part of the settings


@dataclass
class CertifyOptions(ReportOptions, CertifySettings):
    """Certification options (flags --certify.*, or the certify: section of --config).

    Args:
        split: data split to certify.
        skip: certify every skip-th point of the split.
        max: certify at most this many points (None: all); may be raised on a rerun to extend it.
        out: output directory (default: certify/<checkpoint name>_<split>_n<n>).
        device: auto, cpu or cuda.
        compare: another run's certify.tsv to overlay in the plot (e.g. RS vs IDRS).
    """

    split: Literal["test", "val", "train"] = "test"
    skip: PositiveInt = 1
    max: Optional[PositiveInt] = None
    out: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compare: Optional[str] = None

    def __post_init__(self):
        CertifySettings.__post_init__(self)
        ReportOptions.__post_init__(self)


@dataclass
class WandbOptions:
    """Weights & Biases logging; the run folder goes inside the output directory.

    Args:
        mode: offline (default, no account needed), online or disabled.
        project: W&B project name.
    """

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "lightning-idrs"


# ------------------------------------------------------------------------------------ options
def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_idrs certify", default_env=False, exit_on_error=False,
                            description="Certify a trained lightning_idrs checkpoint (Cohen et al.'s CERTIFY).")
    parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="checkpoint written by `fit`.")
    parser.add_argument(
        "--config", type=Optional[str], default=None,
        help="YAML (e.g. a fit config): its data: section overrides the checkpoint's data, its certify: "
        "section sets defaults for --certify.*; everything else is ignored.",
    )
    parser.add_argument("--data.root", type=Optional[str], default=None, help="override only the data root.")
    parser.add_class_arguments(CertifyOptions, "certify")
    parser.add_class_arguments(WandbOptions, "wandb")
    return parser


def _load_yaml(path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise UsageError(f"--config: no such file: {path}")
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path} is not valid YAML: {one_line(error)}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config {path} must hold a mapping (keys data:, certify:)")
    for key in ("data", "certify"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise UsageError(f"--config {path}: the {key}: section must be a mapping")
    return config


def parse_args(argv):
    """(options namespace, config dict). The config's certify: section gives defaults to the flags."""
    from lightning_idrs.commands.trainer import packaged_config

    parser = build_parser()
    cfg = parser.parse_args(list(argv))
    config = _load_yaml(packaged_config(cfg.config)) if cfg.config else {}
    if config.get("certify"):
        try:
            parser.set_defaults({f"certify.{k}": v for k, v in config["certify"].items()})
        except KeyError as error:
            raise UsageError(f"--config {cfg.config}: unknown certify option ({one_line(error)})") from None
        cfg = parser.parse_args(list(argv))
    if not cfg.ckpt_path:
        raise UsageError("--ckpt_path is required (a checkpoint written by `python -m lightning_idrs fit`)")
    return cfg, config


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--certify.device cuda: no CUDA device is available")
    return torch.device(name)


def _compare_columns(path: Optional[str]):
    """The compare TSV's columns and label, read before any point is certified."""
    if path is None:
        return None
    from lightning_idrs.reporting import SUMMARY_NAME, read_summary
    from lightning_idrs.tsv_log import read_tsv

    try:
        columns = read_tsv(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"--certify.compare {path}: {one_line(error)}") from None
    if len(columns["idx"]) == 0:
        raise UsageError(f"--certify.compare {path}: the file holds no rows")
    try:
        label = read_summary(Path(path).parent / SUMMARY_NAME)["sigma_label"]
    except (OSError, ValueError, KeyError, TypeError):
        label = Path(path).resolve().parent.name or "compare"
    return label, columns


# ------------------------------------------------------------------------------------ work
def certify_points(log, smoothed, dataset, selected: np.ndarray, opts: CertifyOptions, device) -> int:
    """Certify the unfinished chunks of ``selected`` and append their missing rows; returns #new rows."""
    from tqdm import tqdm

    from lightning_idrs.smoothing import certify_chunks, plan_chunks

    todo = [(c, idx) for c, idx in plan_chunks(selected, opts.points_per_chunk) if not log.done.issuperset(idx.tolist())]
    written = 0
    bar = tqdm(total=len(selected), initial=sum(int(i in log.done) for i in selected.tolist()), unit="pt",
               desc="certify", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)
    try:
        for done in certify_chunks(smoothed, dataset, todo, opts, device):
            cert, correct = done.certificates, done.certificates.correct(done.labels)
            rows = [(int(i), int(done.labels[j]), int(cert.prediction[j]), float(cert.radius[j]), int(correct[j]),
                     float(cert.sigma[j]), float(cert.p_a_lower[j]), done.seconds_per_point)
                    for j, i in enumerate(done.indices.tolist()) if i not in log.done]
            written += log.append(rows)
            bar.update(len(rows))
    finally:
        bar.close()
    return written


def _wandb_offline(mode: str) -> bool:
    """Offline unless online was asked for and is possible now (else one warning, and offline)."""
    from lightning_idrs.reporting import wandb_online_problem

    problem = wandb_online_problem() if mode == "online" else None
    if problem is not None:
        print(f"warning: W&B cannot log online: {problem}; logging offline instead (`wandb sync` uploads the "
              "run later)", file=sys.stderr, flush=True)
    return mode != "online" or problem is not None


def _log_wandb(out: Path, summary: dict, png: Path, sigmas, wandb_opts: WandbOptions) -> None:
    from pytorch_lightning.loggers import WandbLogger

    from lightning_idrs.reporting import keep_wandb_files_under, log_to_wandb, scalars

    import wandb

    keep_wandb_files_under(out)
    config = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    logger = WandbLogger(save_dir=str(out), project=wandb_opts.project, offline=_wandb_offline(wandb_opts.mode),
                         job_type="certify", config=config, reinit="create_new",
                         settings=wandb.Settings(silent=True, init_timeout=30))
    try:
        logger.log_metrics(scalars(summary))
        log_to_wandb(logger, summary, png, summary["sigma_label"], sigmas=sigmas)
        logger.experiment.summary.update(scalars(summary))
    finally:
        logger.experiment.finish()


def _report(out: Path, summary: dict, columns: dict, grid, compare, wandb_opts: WandbOptions) -> Path:
    """summary.json, the PNG (with the compare curve) and W&B; returns the PNG's path."""
    from lightning_idrs.reporting import PLOT_NAME, SUMMARY_NAME, curve, curve_from_tsv_columns, plot_curves, write_summary

    write_summary(out / SUMMARY_NAME, summary)
    curves = {summary["sigma_label"]: curve(summary)}
    if compare is not None:
        label = compare[0] if compare[0] not in curves else f"{compare[0]} [compare]"
        curves[label] = (grid, curve_from_tsv_columns(compare[1], grid))
    title = f"{summary['dataset']} {summary['split']}: n={summary['n']}, alpha={summary['alpha']:g}"
    png = plot_curves(curves, out / PLOT_NAME, title=title)
    if wandb_opts.mode != "disabled":
        try:
            _log_wandb(out, summary, png, columns["sigma"], wandb_opts)
        except Exception as error:  # the results are on disk; a logging failure must not hide them
            print(f"warning: W&B logging failed: {one_line(error)[:300]}", file=sys.stderr)
    return png


def run(cfg, config: dict) -> int:
    """Load, certify the unfinished points, write summary/plot, log to W&B. Returns the exit code."""
    from lightning_idrs.checkpoint import load_checkpoint
    from lightning_idrs.reporting import SUMMARY_NAME, radius_grid
    from lightning_idrs.smoothing import SmoothedClassifier
    from lightning_idrs.tsv_log import TSV_NAME, CertifyLog

    opts, wandb_opts = CertifyOptions(**vars(cfg.certify)), WandbOptions(**vars(cfg.wandb))
    compare = _compare_columns(opts.compare)
    device = _device(opts.device)
    overrides = {} if cfg.data.root is None else {"root": cfg.data.root}
    loaded = load_checkpoint(cfg.ckpt_path, device, data=config.get("data"), overrides=overrides)
    model, datamodule = loaded.model, loaded.datamodule
    try:
        r = float(model.sigma.semi_elasticity)  # r * Lip(phi), the r of the radius
    except ValueError as error:  # e.g. an approximate kNN index or an embedding without a Lipschitz bound
        raise UsageError(f"this checkpoint's sigma(x) cannot be certified: {one_line(error)}") from None
    dataset = datamodule.split_dataset(opts.split)
    selected = np.arange(0, len(dataset), opts.skip)[: opts.max]
    settings = {
        "checkpoint_sha256": loaded.sha256, "dataset": datamodule.name, "data_fingerprint": datamodule.fingerprint(),
        "split": opts.split, "split_fingerprint": datamodule.fingerprint(opts.split), "dim": model.input_dim,
        "sigma": model.hparams.sigma, "semi_elasticity": r, "skip": opts.skip, "noise": NOISE_SCHEME,
        **asdict(CertifySettings(opts.n0, opts.n, opts.alpha, opts.batch_size, opts.seed, opts.points_per_chunk)),
    }
    out = Path(opts.out or Path("certify") / f"{Path(cfg.ckpt_path).stem}_{opts.split}_n{opts.n}")
    print(f"certify: {cfg.ckpt_path} ({model.sigma.label}, N={model.input_dim}) on {datamodule.name}/{opts.split}, "
          f"{len(selected)} points, n0={opts.n0}, n={opts.n}, alpha={opts.alpha:g}, device {device}, output {out}",
          flush=True)
    try:
        log = CertifyLog(out, settings)
    except (ValueError, RuntimeError, OSError) as error:
        raise UsageError(one_line(error)) from None
    with log:
        if log.repaired:
            print(f"note: {out / TSV_NAME}: dropped a {log.repaired}", file=sys.stderr)
        smoothed = SmoothedClassifier(model.model, model.sigma, model.hparams.num_classes)
        start = time.perf_counter()
        new = certify_points(log, smoothed, dataset, selected, opts, device)
        elapsed = time.perf_counter() - start
        columns = log.columns(only=selected)  # the summary describes exactly the selected points
        grid = radius_grid(opts, columns["radius"])
        stats = log.summarize(grid, model.hparams.num_classes, only=selected)
    summary = {**settings, "checkpoint": str(cfg.ckpt_path), "sigma_label": model.sigma.label, "max": opts.max,
               "device": str(device), "num_selected": int(len(selected)), **stats}
    png = _report(out, summary, columns, grid, compare, wandb_opts)
    shown = [k for k in summary["certified_accuracy"] if float(k) % 0.25 < 1e-9][:12]
    print(f"certified {new} new point(s) in {elapsed:.1f} s; {summary['num_points']} in {out / TSV_NAME}")
    print("certified accuracy: " + ", ".join(f"R={k}: {summary['certified_accuracy'][k]:.3f}" for k in shown))
    print(f"ACR {summary['acr']:.4f}, abstain rate {summary['abstain_rate']:.3f}, "
          f"smoothed clean accuracy {summary['clean_accuracy']:.3f}")
    print(f"wrote {out / SUMMARY_NAME} and {png}", flush=True)
    return 0


def main(argv=None) -> int:
    """``python -m lightning_idrs certify``: 0 on success, 2 with one ``error:`` line on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(lambda args: run(*parse_args(args)), sys.argv[1:] if argv is None else list(argv))


__all__ = ["CertifyOptions", "WandbOptions", "main"]
