"""``python -m lightning_idrs certify``: certify a trained checkpoint on a data split (Cohen et al., CERTIFY).

    python -m lightning_idrs certify --ckpt_path CKPT [--config CFG] [--data.root DIR]
        [--certify.n0 100] [--certify.n 100000] [--certify.alpha 0.001] [--certify.batch_size 1000]
        [--certify.split test] [--certify.skip 1] [--certify.max N] [--certify.out DIR]
        [--certify.compare OTHER/certify.tsv] [--wandb.mode offline|online|disabled]

Data and model settings come from the checkpoint; ``--config`` (e.g. a fit config) may override the
data (its ``data:`` section) and set defaults for the ``certify:`` options; ``--data.root`` overrides
only the data root. The output directory receives ``certify.tsv`` (one row per point, appended and
fsync'ed chunk by chunk), ``summary.json``, ``certified_accuracy.png`` and the W&B run folder.

Reproducibility: the selected points (every ``skip``-th, at most ``max``) are cut into fixed chunks
of ``points_per_chunk`` consecutive points; chunk c is certified in one vectorised call with a fresh
generator seeded from (seed, c). A rerun into the same directory recomputes only unfinished chunks
and appends only the missing rows, so an interrupted and resumed run gives the same rows (but the
``time`` column) as an uninterrupted one on the same device. Everything that changes the rows is
stored in ``settings.json`` and checked on a rerun; ``max`` and the device are not, so a run can be
extended or moved. (Extending ``max`` past a final *partial* chunk recomputes that chunk in full:
its earlier rows stay, the new rows come from the full chunk's noise.)

Heavy imports (torch, Lightning) happen after the options are validated, so bad options fail fast.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

SPLITS = ("test", "val", "train")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("offline", "online", "disabled")
NOISE_SCHEME = "chunk-seeded-v1"  # how noise is derived from (seed, chunk); part of the settings


class UsageError(Exception):
    """Bad input from the user: reported as one ``error: ...`` line and exit code 2."""


@dataclass
class CertifyOptions:
    """Certification options (flags --certify.*, or the certify: section of --config).

    Args:
        n0: noise samples to select the top class (Cohen et al.: 100).
        n: noise samples to estimate pA (Cohen et al.: 100,000).
        alpha: failure probability of the certificate, in (0, 1) (Cohen et al.: 0.001).
        batch_size: noisy samples per forward pass (part of the noise stream: a rerun must keep it).
        split: data split to certify: test, val or train.
        skip: certify every skip-th point of the split.
        max: certify at most this many points (None: all); may be raised on a rerun to extend it.
        out: output directory (default: certify/<checkpoint name>_<split>_n<n>).
        seed: seed of the noise; chunk c uses a generator seeded from (seed, c).
        device: auto, cpu or cuda.
        points_per_chunk: consecutive points certified together in one vectorised call.
        radii_max: largest radius of the summary grid (None: just past the largest radius found).
        radii_step: step of the summary's radius grid.
        compare: another run's certify.tsv to overlay in the plot (e.g. RS vs IDRS).
    """

    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch_size: int = 1000
    split: str = "test"
    skip: int = 1
    max: Optional[int] = None
    out: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    points_per_chunk: int = 10
    radii_max: Optional[float] = None
    radii_step: float = 0.05
    compare: Optional[str] = None


@dataclass
class WandbOptions:
    """Weights & Biases logging; the run folder goes inside the output directory.

    Args:
        mode: offline (default, no account needed), online or disabled.
        project: W&B project name.
    """

    mode: str = "offline"
    project: str = "lightning-idrs"


# ------------------------------------------------------------------------------------ options
def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="python -m lightning_idrs certify",
        description="Certify a trained lightning_idrs checkpoint (randomized smoothing, Cohen et al. CERTIFY).",
        default_env=False,
    )
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


def _one_line(error) -> str:
    """A (possibly multi-line) error message as one line: lines joined by '; ' (by ' ' after a colon)."""
    text = ""
    for line in filter(None, (line.strip() for line in str(error).splitlines())):
        text = line if not text else text + (" " if text.endswith(":") else "; ") + line
    return text


def _load_yaml(path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise UsageError(f"--config: no such file: {path}")
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path} is not valid YAML: {_one_line(error)}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config {path} must hold a mapping (keys data:, certify:)")
    for key in ("data", "certify"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise UsageError(f"--config {path}: the {key}: section must be a mapping")
    return config


def parse_args(argv):
    """(options namespace, config dict). The config's certify: section gives defaults to the flags."""
    parser = build_parser()
    cfg = parser.parse_args(list(argv))
    config = _load_yaml(cfg.config) if cfg.config else {}
    if config.get("certify"):
        try:
            parser.set_defaults({f"certify.{k}": v for k, v in config["certify"].items()})
        except KeyError as error:
            raise UsageError(f"--config {cfg.config}: unknown certify option ({_one_line(error)})") from None
        cfg = parser.parse_args(list(argv))
    return cfg, config


def validate(opts: CertifyOptions, wandb_mode: str, ckpt_path: Optional[str]) -> None:
    """Check every option (alpha first) before anything is loaded."""
    if not (isinstance(opts.alpha, (int, float)) and 0.0 < opts.alpha < 1.0):
        raise UsageError(f"--certify.alpha must lie in (0, 1), got {opts.alpha}")
    for name in ("n0", "n", "batch_size", "skip"):
        if getattr(opts, name) < 1:
            raise UsageError(f"--certify.{name} must be an integer >= 1, got {getattr(opts, name)}")
    if opts.max is not None and opts.max < 1:
        raise UsageError(f"--certify.max must be >= 1 (or null for all points), got {opts.max}")
    if opts.split not in SPLITS:
        raise UsageError(f"--certify.split must be one of {', '.join(SPLITS)}, got {opts.split!r}")
    if opts.points_per_chunk < 1:
        raise UsageError(f"--certify.points_per_chunk must be >= 1, got {opts.points_per_chunk}")
    if opts.seed < 0:
        raise UsageError(f"--certify.seed must be >= 0, got {opts.seed}")
    if opts.device not in DEVICES:
        raise UsageError(f"--certify.device must be one of {', '.join(DEVICES)}, got {opts.device!r}")
    if not (math.isfinite(opts.radii_step) and opts.radii_step > 0):
        raise UsageError(f"--certify.radii_step must be > 0, got {opts.radii_step}")
    if opts.radii_max is not None and not (math.isfinite(opts.radii_max) and 0 <= opts.radii_max):
        raise UsageError(f"--certify.radii_max must be >= 0, got {opts.radii_max}")
    if opts.radii_max is not None and opts.radii_max / opts.radii_step > 10_000:
        raise UsageError("the radius grid (--certify.radii_max / --certify.radii_step) has over 10,000 points")
    if wandb_mode not in WANDB_MODES:
        raise UsageError(f"--wandb.mode must be one of {', '.join(WANDB_MODES)}, got {wandb_mode!r}")
    if opts.compare is not None and not Path(opts.compare).is_file():
        raise UsageError(f"--certify.compare: no such file: {opts.compare}")
    if not ckpt_path:
        raise UsageError("--ckpt_path is required (a checkpoint written by `python -m lightning_idrs fit`)")


# ------------------------------------------------------------------------------------ loading
def load_checkpoint(path: str, device):
    """(model on ``device`` in eval mode, checkpoint dict, sha256 of the file); UsageError if unusable."""
    import torch

    from lightning_idrs.module import CHECKPOINT_KEY, IDRSClassifier

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    data = file.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as error:  # random bytes raise anything from UnpicklingError to RuntimeError
        raise UsageError(
            f"cannot read checkpoint {path} (corrupt or not a PyTorch file): {_one_line(error)[:200]}"
        ) from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise UsageError(f"{path} is not a lightning_idrs checkpoint (no {CHECKPOINT_KEY!r} entry); train with `fit`")
    try:
        model = IDRSClassifier.load_from_checkpoint(io.BytesIO(data), map_location=device)
    except Exception as error:
        raise UsageError(f"cannot load the model from {path}: {_one_line(error)[:300]}") from None
    return model.to(device).eval(), checkpoint, sha256


def _resolve_datamodule(class_path: str):
    from lightning_idrs.data import IDRSDataModule

    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "lightning_idrs.data"), name)
    except (ImportError, AttributeError, ValueError):
        raise UsageError(f"unknown data module class {class_path!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, IDRSDataModule)):
        raise UsageError(f"{class_path!r} is not a lightning_idrs data module (IDRSDataModule subclass)")
    return cls


def build_datamodule(checkpoint: dict, config_data: Optional[dict], root: Optional[str]):
    """The checkpoint's data module, its init args overridden by ``config_data`` and ``root``."""
    from lightning_idrs.module import CHECKPOINT_KEY

    saved = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    class_path = checkpoint[CHECKPOINT_KEY].get("datamodule_class") or saved.get("_class_path")
    init_args = {k: v for k, v in saved.items() if not k.startswith("_")}
    if config_data:
        new_path = config_data.get("class_path")
        new_args = config_data.get("init_args", {} if new_path else config_data) or {}
        if new_path and (class_path is None or _resolve_datamodule(new_path) is not _resolve_datamodule(class_path)):
            init_args = {}  # another data module: the checkpoint's arguments do not apply
        init_args.update(new_args)
        class_path = new_path or class_path
    if class_path is None:
        raise UsageError("the checkpoint does not record its data module; pass --config with a data: section")
    cls = _resolve_datamodule(class_path)
    if root is not None:
        if "root" not in inspect.signature(cls.__init__).parameters:
            raise UsageError(f"--data.root: the data module {cls.__name__} takes no root")
        init_args["root"] = root
    try:
        return cls(**init_args)
    except (TypeError, ValueError) as error:
        raise UsageError(f"cannot build the data module {cls.__name__}({init_args}): {_one_line(error)}") from None


def _dataset_fingerprint(dataset) -> str:
    """sha256 of the split's images and labels (detects any change of the certified points)."""
    import torch

    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if images is None or labels is None:
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
    digest = hashlib.sha256(f"{tuple(images.shape)}|{images.dtype}|".encode())
    digest.update(np.ascontiguousarray(images.cpu().numpy()).tobytes())
    digest.update(np.ascontiguousarray(labels.cpu().numpy().astype("<i8")).tobytes())
    return digest.hexdigest()


def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit generator seed for chunk ``chunk`` of a run with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--certify.device cuda: no CUDA device is available")
    return torch.device(name)


# ------------------------------------------------------------------------------------ work
def certify_points(log, smoothed, dataset, selected: np.ndarray, opts: CertifyOptions, device) -> int:
    """Certify the unfinished chunks of ``selected`` and append their missing rows; returns #new rows."""
    import torch
    from tqdm import tqdm

    size = opts.points_per_chunk
    chunks = [selected[i : i + size] for i in range(0, len(selected), size)]
    todo = [c for c, idx in enumerate(chunks) if not log.done.issuperset(idx.tolist())]
    already = sum(int(i in log.done) for i in selected.tolist())
    written = 0
    bar = tqdm(total=len(selected), initial=already, unit="pt", desc="certify", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)
    try:
        for c in todo:
            idx = chunks[c]
            items = [dataset[int(i)] for i in idx]
            x = torch.stack([item[0] for item in items]).to(device)
            labels = np.asarray([int(item[1]) for item in items])
            generator = torch.Generator(device=device).manual_seed(chunk_seed(opts.seed, c))
            start = time.perf_counter()
            with torch.inference_mode():
                cert = smoothed.certify(x, opts.n0, opts.n, opts.alpha, opts.batch_size, generator)
            seconds = (time.perf_counter() - start) / len(idx)
            correct = cert.correct(labels)
            rows = [
                (int(i), int(labels[j]), int(cert.prediction[j]), float(cert.radius[j]), int(correct[j]),
                 float(cert.sigma[j]), float(cert.p_a_lower[j]), seconds)
                for j, i in enumerate(idx.tolist()) if i not in log.done
            ]
            written += log.append(rows)
            bar.update(len(rows))
    finally:
        bar.close()
    return written


def _run_label(summary: dict) -> str:
    if summary.get("semi_elasticity", 0) > 0:
        return f"IDRS (sigma_b={summary['sigma_base']:g}, r={summary['semi_elasticity']:g})"
    return f"RS (sigma={summary['sigma_base']:g})"


def _compare_label(tsv: str) -> str:
    from lightning_idrs.results import SUMMARY_NAME, read_summary

    try:
        return _run_label(read_summary(Path(tsv).parent / SUMMARY_NAME))
    except (OSError, ValueError, KeyError, TypeError):
        return Path(tsv).resolve().parent.name or "compare"


def plot(out: Path, summary: dict, opts: CertifyOptions, grid) -> Path:
    from lightning_idrs.plots import plot_tsvs
    from lightning_idrs.results import PLOT_NAME, TSV_NAME

    tsvs = {_run_label(summary): out / TSV_NAME}
    if opts.compare:
        label = _compare_label(opts.compare)
        tsvs[label if label not in tsvs else f"{label} [compare]"] = Path(opts.compare)
    title = f"{summary['dataset']} {summary['split']}: n={summary['n']}, alpha={summary['alpha']:g}"
    try:
        return plot_tsvs(tsvs, out / PLOT_NAME, radii=grid if opts.radii_max is not None else None, title=title)
    except ValueError as error:
        raise UsageError(f"cannot plot: {_one_line(error)}") from None


def log_wandb(out: Path, summary: dict, png: Path, wandb_opts: WandbOptions) -> None:
    """Log the summary scalars, the (radius, certified accuracy) table + line plot and the PNG."""
    if wandb_opts.mode == "disabled":
        return
    import wandb

    from lightning_idrs.metrics import radius_key

    keys = ("acr", "abstain_rate", "clean_accuracy", "mean_sigma", "num_points")
    scalars = {f"certify/{k}": summary[k] for k in keys}
    scalars.update({f"certify/acc@{k}": v for k, v in summary["certified_accuracy"].items()})
    table = wandb.Table(columns=["radius", "certified_accuracy"],
                        data=[[R, summary["certified_accuracy"][radius_key(R)]] for R in summary["radii"]])
    config = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    run = wandb.init(dir=str(out), mode=wandb_opts.mode, project=wandb_opts.project, job_type="certify",
                     config=config, settings=wandb.Settings(silent=True), reinit="create_new")
    try:
        run.log({**scalars, "certify/table": table,
                 "certify/curve": wandb.plot.line(table, "radius", "certified_accuracy", title=_run_label(summary)),
                 "certify/plot": wandb.Image(str(png))})
        run.summary.update(scalars)
    finally:
        run.finish()


def radius_grid(radius: np.ndarray, opts: CertifyOptions) -> np.ndarray:
    from lightning_idrs.metrics import default_radius_grid

    if opts.radii_max is not None:
        return default_radius_grid(opts.radii_max, opts.radii_step)
    finite = radius[np.isfinite(radius)]
    top = float(finite.max()) if finite.size else 0.0
    return default_radius_grid(math.ceil(top / opts.radii_step) * opts.radii_step + opts.radii_step, opts.radii_step)


def run(cfg, config: dict) -> int:
    """Load, certify the unfinished points, write summary/plot, log to W&B. Returns the exit code."""
    opts = CertifyOptions(**vars(cfg.certify))
    wandb_opts = WandbOptions(**vars(cfg.wandb))
    validate(opts, wandb_opts.mode, cfg.ckpt_path)

    from lightning_idrs.data import DataNotFoundError
    from lightning_idrs.results import SUMMARY_NAME, TSV_NAME, CertifyLog, write_summary
    from lightning_idrs.smoothing import SmoothedClassifier

    device = _device(opts.device)
    model, checkpoint, sha256 = load_checkpoint(cfg.ckpt_path, device)
    datamodule = build_datamodule(checkpoint, config.get("data"), cfg.data.root)
    try:
        model.attach_data(datamodule)  # checks shape, classes, data fingerprint; fits sigma's kNN index
        dataset = datamodule.split_dataset(opts.split)
    except DataNotFoundError as error:
        raise UsageError(_one_line(error)) from None
    except ValueError as error:
        raise UsageError(f"checkpoint and data do not match: {_one_line(error)}") from None
    try:
        r = float(model.sigma.semi_elasticity)  # r * Lip(phi), the r of the radius
    except ValueError as error:  # e.g. an approximate kNN index or an embedding without a Lipschitz bound
        raise UsageError(f"this checkpoint's sigma(x) cannot be certified: {_one_line(error)}") from None

    selected = np.arange(0, len(dataset), opts.skip)[: opts.max]
    info = checkpoint["lightning_idrs"]
    settings = {
        "checkpoint_sha256": sha256, "dataset": datamodule.name, "data_fingerprint": datamodule.fingerprint(),
        "split": opts.split, "split_fingerprint": _dataset_fingerprint(dataset), "dim": model.input_dim,
        "sigma": info["sigma"], "sigma_base": float(info["sigma_base"]), "semi_elasticity": r,
        "n0": opts.n0, "n": opts.n, "alpha": float(opts.alpha), "batch_size": opts.batch_size, "skip": opts.skip,
        "seed": opts.seed, "points_per_chunk": opts.points_per_chunk, "noise": NOISE_SCHEME,
    }
    out = Path(opts.out or Path("certify") / f"{Path(cfg.ckpt_path).stem}_{opts.split}_n{opts.n}")
    print(f"certify: {cfg.ckpt_path} ({'IDRS' if r > 0 else 'RS'}, sigma_b={settings['sigma_base']:g}, r={r:g}, "
          f"N={model.input_dim}) on {datamodule.name}/{opts.split}, {len(selected)} points, n0={opts.n0}, "
          f"n={opts.n}, alpha={opts.alpha:g}, device {device}, output {out}", flush=True)
    try:
        log = CertifyLog(out, settings)
    except (ValueError, RuntimeError, OSError) as error:
        raise UsageError(_one_line(error)) from None
    with log:
        if log.repaired:
            print(f"note: {out / TSV_NAME}: dropped a {log.repaired}", file=sys.stderr)
        smoothed = SmoothedClassifier(model.model, model.sigma, model.hparams.num_classes)
        start = time.perf_counter()
        new = certify_points(log, smoothed, dataset, selected, opts, device)
        elapsed = time.perf_counter() - start
        grid = radius_grid(log.columns()["radius"], opts)
        stats = log.summarize(grid, model.hparams.num_classes)
    summary = {**settings, "checkpoint": str(cfg.ckpt_path), "max": opts.max, "device": str(device),
               "num_selected": int(len(selected)), **stats}
    write_summary(out / SUMMARY_NAME, summary)
    png = plot(out, summary, opts, grid)
    try:
        log_wandb(out, summary, png, wandb_opts)
    except Exception as error:  # the results are on disk; a logging failure must not hide them
        print(f"warning: W&B logging failed: {_one_line(error)[:300]}", file=sys.stderr)

    shown = [k for k in summary["certified_accuracy"] if float(k) % 0.25 < 1e-9][:12]
    print(f"certified {new} new point(s) in {elapsed:.1f} s; {summary['num_points']} in {out / TSV_NAME}")
    print("certified accuracy: " + ", ".join(f"R={k}: {summary['certified_accuracy'][k]:.3f}" for k in shown))
    print(f"ACR {summary['acr']:.4f}, abstain rate {summary['abstain_rate']:.3f}, "
          f"smoothed clean accuracy {summary['clean_accuracy']:.3f}")
    print(f"wrote {out / SUMMARY_NAME} and {png}", flush=True)
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m lightning_idrs certify``: 0 on success, 2 on bad input (one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg, config = parse_args(argv)
        return run(cfg, config)
    except SystemExit as exit_:  # jsonargparse: --help (0) or a malformed flag (it printed the error)
        return exit_.code if isinstance(exit_.code, int) else 2
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished rows are saved; rerun the same command to resume", file=sys.stderr)
        return 130


__all__ = ["CertifyOptions", "WandbOptions", "UsageError", "chunk_seed", "main"]
