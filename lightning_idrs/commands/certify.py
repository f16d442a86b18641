"""``python -m lightning_idrs certify``: certify a trained checkpoint on a data split (Cohen et al., CERTIFY).

    python -m lightning_idrs certify --ckpt_path CKPT [--config CFG] [--data.root DIR]
        [--certify.n0 100] [--certify.n 100000] [--certify.alpha 0.001] [--certify.batch_size 1000]
        [--certify.split test] [--certify.skip 1] [--certify.max N] [--certify.out DIR]
        [--certify.compare OTHER/certify.tsv] [--certify.channels_last true] [--wandb.mode offline|online|disabled]

Data and model settings come from the checkpoint (:mod:`lightning_idrs.checkpoint`); ``--config``
(e.g. a fit config) may override the data (its ``data:`` section) and set defaults for the
``certify:`` options; ``--data.root`` overrides only the data root. The output directory receives
``certify.tsv`` (one row per point, appended and fsync'ed chunk by chunk), ``summary.json``,
``certified_accuracy.png`` and the W&B run folder.

Reproducibility: the selected points (every ``skip``-th, at most ``max``) are cut into fixed chunks
of ``points_per_chunk`` consecutive points; chunk c is certified with noise seeded from (seed, c)
(:func:`lightning_idrs.sharding.certify_chunks`). A rerun into the same directory recomputes only
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
from lightning_idrs.sharding import CertifySettings
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
        compare: another run's certify.tsv to overlay in the plot (e.g. RS vs IDRS).
        accelerator: auto, cpu or gpu (Lightning Fabric).
        devices: processes (GPUs) per node; the points are shared out over all of them.
        num_nodes: nodes (with torchrun or SLURM, which start the processes).
        strategy: Fabric's strategy; default ddp when there is more than one process.
        precision: 32-true, or bf16-mixed / 16-mixed to autocast the base model (counts and bounds stay exact).
        channels_last: store a convolutional model's weights channels-last (NHWC): faster forward passes on
            CPU (benchmarks/README.md); the logits move by float rounding only. false: the layout it was trained in.
        device: the older option: auto, cpu or cuda, an alias of accelerator.
    """

    split: Literal["test", "val", "train"] = "test"
    skip: PositiveInt = 1
    max: Optional[PositiveInt] = None
    out: Optional[str] = None
    compare: Optional[str] = None
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: PositiveInt = 1
    num_nodes: PositiveInt = 1
    strategy: Optional[str] = None
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    channels_last: bool = True
    device: Optional[Literal["auto", "cpu", "cuda"]] = None

    def __post_init__(self):
        CertifySettings.__post_init__(self)
        ReportOptions.__post_init__(self)


@dataclass
class WandbOptions:
    """Weights & Biases logging; the run folder goes inside the output directory.

    Args:
        mode: offline (default, no account needed), online or disabled.
        project: W&B project name.
        entity: W&B entity (user or team; default: yours).
        name: run name (default: W&B's).
        group: run group (default: the group of the fit run that wrote the checkpoint).
        tags: run tags (default: the data set and the kind of sigma, RS, IDRS or your class).
        notes: run notes.
    """

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "lightning-idrs"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: Optional[list[str]] = None
    notes: Optional[str] = None


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


def _radii_as_list(argv: list) -> list:
    """``--certify.radii 0.25,0.5`` as the YAML list jsonargparse reads (``[0.25,0.5]``)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--certify.radii" and i + 1 < len(out) and "," in out[i + 1] and "[" not in out[i + 1]:
            out[i + 1] = f"[{out[i + 1]}]"
        elif arg.startswith("--certify.radii=") and "," in arg and "[" not in arg:
            out[i] = f"--certify.radii=[{arg.split('=', 1)[1]}]"
    return out


def parse_args(argv):
    """(options namespace, config dict). The config's certify: section gives defaults to the flags."""
    from lightning_idrs.commands.trainer import packaged_config

    argv = _radii_as_list(argv)
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


def _started_processes():
    """(launcher, number of processes) when torchrun or SLURM started this one as part of a job, else (None, 1)."""
    import os

    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return "torchrun", int(os.environ["WORLD_SIZE"])
    if SLURMEnvironment.detect():
        return "SLURM", int(os.environ["SLURM_NTASKS"])
    return None, 1


def launch(opts: CertifyOptions):
    """A Lightning Fabric for ``opts``, launched: with several devices it starts the other processes
    (torchrun and SLURM start them instead); every process then runs the rest of the command."""
    import os

    import torch
    from lightning_fabric import Fabric

    accelerator = {"cuda": "gpu"}.get(opts.device, opts.device) if opts.device else opts.accelerator
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise UsageError(f"--certify.{'device cuda' if opts.device else 'accelerator gpu'}: no CUDA GPU is "
                         "available (use cpu or auto)")
    processes = opts.devices * opts.num_nodes
    launcher, started = _started_processes()
    if launcher and started != processes:  # else every process would run a job of its own
        raise UsageError(f"{launcher} started {started} processes but --certify.devices x --certify.num_nodes = "
                         f"{opts.devices} x {opts.num_nodes} = {processes}; make them match")
    strategy = opts.strategy or ("ddp" if processes > 1 else "auto")
    try:
        fabric = Fabric(accelerator=accelerator, devices=opts.devices, num_nodes=opts.num_nodes, strategy=strategy,
                        precision=opts.precision)
    except Exception as error:  # Lightning reports impossible combinations with several exception types
        raise UsageError(f"cannot run on {opts.devices} device(s) x {opts.num_nodes} node(s) with strategy "
                         f"{strategy!r} and precision {opts.precision}: {one_line(error)}") from None
    if fabric.device.type == "cpu" and opts.devices > 1:  # processes share the cores instead of fighting for them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.devices))
    try:  # checks the options against torchrun's / SLURM's processes, then starts or joins them
        fabric.launch()
    except (ValueError, RuntimeError) as error:  # e.g. tasks per node, or a taken MASTER_PORT
        raise UsageError(f"cannot start {opts.devices} process(es) x {opts.num_nodes} node(s) here: {one_line(error)}"
                         + (f" (--certify.devices must match the tasks per node {launcher} started)" if launcher
                            else "")) from None
    return fabric


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
def certify_points(fabric, log, smoothed, dataset, todo: list, total: int, opts: CertifyOptions, radii) -> int:
    """Certify the chunks ``todo`` over all processes; rank 0 appends the missing rows. Returns #new rows."""
    from tqdm import tqdm

    from lightning_idrs.sharding import certify_sharded

    written = 0
    bar = tqdm(total=total, initial=total - sum(len(idx) for _, idx in todo), unit="pt", desc="certify",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr,
               disable=fabric.global_rank != 0)
    try:
        for rows in certify_sharded(smoothed, dataset, todo, opts, fabric.device, fabric.global_rank,
                                    fabric.world_size, fabric.all_gather, radii):
            if log is not None:  # rank 0: one write (and fsync) per round of chunks
                written += log.append([row for row in rows.tolist() if int(row[0]) not in log.done])
            bar.update(len(rows))
    finally:
        bar.close()
    return written


def open_log(fabric, out: Path, settings: dict, selected, opts: CertifyOptions):
    """Rank 0 opens (or resumes) the TSV log; every rank gets the same list of unfinished chunks."""
    from lightning_idrs.sharding import plan_chunks
    from lightning_idrs.tsv_log import TSV_NAME, CertifyLog

    log, status = None, None
    if fabric.global_rank == 0:
        try:
            log = CertifyLog(out, settings)
        except (ValueError, RuntimeError, OSError) as error:
            status = ("error", one_line(error))
        else:
            if log.repaired:
                print(f"note: {out / TSV_NAME}: dropped a {log.repaired}", file=sys.stderr)
            chunks = plan_chunks(selected, opts.points_per_chunk)
            status = ("ok", [(c, idx) for c, idx in chunks if not log.done.issuperset(idx.tolist())])
    status = fabric.broadcast(status, src=0)
    if status[0] == "error":
        raise UsageError(status[1])
    return log, status[1]


def _report(out: Path, summary: dict, columns: dict, grid, compare, wandb_opts: WandbOptions, settings: dict,
            checkpoint: dict) -> Path:
    """summary.json, the PNG (with the compare curve) and W&B; returns the PNG's path."""
    from lightning_idrs.reporting import (PLOT_NAME, SUMMARY_NAME, curve, curve_from_tsv_columns, keep_run_files_under,
                                          plot_curves, write_summary)
    from lightning_idrs.wandb_logging import log_certify_run

    keep_run_files_under(out, wandb=False)
    write_summary(out / SUMMARY_NAME, summary)
    curves = {summary["sigma_label"]: curve(summary)}
    if compare is not None:
        label = compare[0] if compare[0] not in curves else f"{compare[0]} [compare]"
        curves[label] = (grid, curve_from_tsv_columns(compare[1], grid))
    title = f"{summary['dataset']} {summary['split']}: n={summary['n']}, alpha={summary['alpha']:g}"
    png = plot_curves(curves, out / PLOT_NAME, title=title)
    if wandb_opts.mode != "disabled":
        try:
            log_certify_run(out, summary, columns, settings, settings["sigma"], checkpoint, asdict(wandb_opts),
                            png=png, curves=curves)
        except Exception as error:  # the results are on disk; a logging failure must not hide them
            print(f"warning: W&B logging failed: {one_line(error)[:300]}", file=sys.stderr)
    return png


def prepare(cfg, config: dict, opts: CertifyOptions, device):
    """(loaded checkpoint, data set, selected indices, settings): everything that determines the rows."""
    from lightning_idrs.checkpoint import load_checkpoint
    from lightning_idrs.reporting import radius_grid
    from lightning_idrs.smoothing import use_channels_last

    overrides = {} if cfg.data.root is None else {"root": cfg.data.root}
    loaded = load_checkpoint(cfg.ckpt_path, device, data=config.get("data"), overrides=overrides)
    model, datamodule = loaded.model, loaded.datamodule
    try:  # converted: the logits move by rounding, so the layout is recorded with the rows
        converted = opts.channels_last and use_channels_last(model.model, datamodule.input_shape, device)
    except ValueError as error:
        raise UsageError(f"{error}; use --certify.channels_last false") from None
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
        "precision": opts.precision, **({"memory_format": "channels_last"} if converted else {}),
        **asdict(CertifySettings(opts.n0, opts.n, opts.alpha, opts.batch_size, opts.seed, opts.points_per_chunk,
                                 opts.sequential)),
    }
    if opts.sequential:  # the grid decides when a point stops: it is part of what determines the rows
        settings["radii"] = radius_grid(opts).tolist()
    return loaded, dataset, selected, settings


def run(cfg, config: dict) -> int:
    """Launch, load, certify the unfinished points, write summary/plot, log to W&B. Returns the exit code."""
    import torch.distributed

    opts, wandb_opts = CertifyOptions(**vars(cfg.certify)), WandbOptions(**vars(cfg.wandb))
    if opts.sequential and opts.radii is None and opts.radii_max is None:
        raise UsageError("--certify.sequential true needs the radius grid it decides on: --certify.radii "
                         "0.25,0.5,0.75,1.0 (or --certify.radii_max with --certify.radii_step)")
    compare = _compare_columns(opts.compare)
    fabric = launch(opts)
    try:
        return certify_and_report(fabric, cfg, config, opts, wandb_opts, compare)
    finally:  # leave the process group before exiting: a live gloo group can abort the interpreter at exit
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def certify_and_report(fabric, cfg, config: dict, opts: CertifyOptions, wandb_opts: WandbOptions, compare) -> int:
    """Every process: load and certify its share; rank 0 then writes the summary, the plot and the W&B run."""
    from contextlib import nullcontext

    from lightning_idrs.reporting import SUMMARY_NAME, radius_grid
    from lightning_idrs.smoothing import SmoothedClassifier
    from lightning_idrs.tsv_log import TSV_NAME

    loaded, dataset, selected, settings = prepare(cfg, config, opts, fabric.device)
    model, rank0 = loaded.model, fabric.global_rank == 0
    out = Path(opts.out or Path("certify") / f"{Path(cfg.ckpt_path).stem}_{opts.split}_n{opts.n}")
    if rank0:
        print(f"certify: {cfg.ckpt_path} ({model.sigma.label}, N={model.input_dim}) on {loaded.datamodule.name}/"
              f"{opts.split}, {len(selected)} points, n0={opts.n0}, n={opts.n}, alpha={opts.alpha:g}, "
              f"{fabric.world_size} process(es) on {fabric.device.type}, output {out}", flush=True)
    log, todo = open_log(fabric, out, settings, selected, opts)
    smoothed = SmoothedClassifier(model.model, model.sigma, model.hparams.num_classes, forward_context=fabric.autocast)
    with log if log is not None else nullcontext():
        start = time.perf_counter()
        new = certify_points(fabric, log, smoothed, dataset, todo, len(selected), opts, settings.get("radii"))
        elapsed = time.perf_counter() - start
        if not rank0:
            return 0
        columns = log.columns(only=selected)  # the summary describes exactly the selected points
        grid = radius_grid(opts, columns["radius"])
        stats = log.summarize(grid, model.hparams.num_classes, only=selected)
    summary = {**settings, "checkpoint": str(cfg.ckpt_path), "sigma_label": model.sigma.label, "max": opts.max,
               "device": fabric.device.type, "processes": fabric.world_size, "num_selected": int(len(selected)),
               **stats}
    checkpoint = {"path": str(cfg.ckpt_path), "sha256": loaded.sha256,
                  "config": {"model": dict(model.hparams), "lightning_idrs": loaded.metadata}}
    png = _report(out, summary, columns, grid, compare, wandb_opts, settings, checkpoint)
    shown = [k for k in summary["certified_accuracy"] if float(k) % 0.25 < 1e-9][:12]
    print(f"certified {new} new point(s) in {elapsed:.1f} s; {summary['num_points']} in {out / TSV_NAME}")
    print("certified accuracy: " + ", ".join(f"R={k}: {summary['certified_accuracy'][k]:.3f}" for k in shown))
    print(f"ACR {summary['acr']:.4f}, abstain rate {summary['abstain_rate']:.3f}, "
          f"smoothed clean accuracy {summary['clean_accuracy']:.3f}; estimation samples {summary['total_samples']:,} "
          f"({summary['mean_samples']:,.0f} per point)")
    print(f"wrote {out / SUMMARY_NAME} and {png}", flush=True)
    return 0


def main(argv=None) -> int:
    """``python -m lightning_idrs certify``: 0 on success, 2 with one ``error:`` line on bad input."""
    from lightning_idrs.commands import guarded

    return guarded(lambda args: run(*parse_args(args)), sys.argv[1:] if argv is None else list(argv))


__all__ = ["CertifyOptions", "WandbOptions", "main"]
