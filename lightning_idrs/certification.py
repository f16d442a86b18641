"""The certify job as a Python function: :func:`certify` (``lightning_idrs.certify``).

    import lightning_idrs
    result = lightning_idrs.certify("best.ckpt", "runs/idrs", n=10_000, max=100)
    result.summary["acr"], result.rows["radius"]

It loads the checkpoint (:mod:`lightning_idrs.checkpoint`), certifies the selected points of a split
(fixed n, or sequentially on a radius grid) on the processes it is launched on (Lightning Fabric:
one, several devices, or every process that torchrun / SLURM started), and writes the output folder:
``settings.json``, ``certify.tsv`` (one row per point, appended and fsync'ed), ``summary.json``,
``certified_accuracy.png`` and the W&B run. ``python -m lightning_idrs certify`` only parses its
options and calls :func:`certify`.

Reproducibility: the noise of a point is a function of (seed, the point's index in the data set)
only (:class:`~lightning_idrs.smoothing.PointNoise`), so skip, max, the chunking, the batch size,
interruptions and the number of processes never change a row (on one kind of device). A rerun into
the same folder certifies only the points it lacks; everything that determines the rows is stored in
``settings.json`` and checked, and a folder written with another noise version is refused.
"""
from __future__ import annotations

import errno
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np

from lightning_idrs.reporting import ReportOptions, read_compare
from lightning_idrs.sharding import ROW_SETTINGS, CertifySettings
from lightning_idrs.arguments import PositiveInt, UsageError, one_line

__all__ = ["CertifyOptions", "CertifyResult", "WandbOptions", "certify"]


@dataclass
class CertifyOptions(ReportOptions, CertifySettings):
    """Certification options (flags --certify.*, or the certify: section of --config).

    Args:
        split: data split to certify.
        skip: certify every skip-th point of the split.
        max: certify at most this many points (None: all); may be raised on a rerun to extend it.
        out: output folder (default: certify/<checkpoint name>-<digest>_<split>_n<n>, one per checkpoint).
        compare: other runs' certify.tsv (or their folders), one or a list, to overlay in the plot and the
            W&B chart (e.g. RS vs IDRS).
        accelerator: auto, cpu or gpu (Lightning Fabric).
        devices: processes (GPUs) per node; the points are shared out over all of them.
        num_nodes: nodes (with torchrun or SLURM, which start the processes).
        strategy: Fabric's strategy; default ddp when there is more than one process.
        precision: 32-true, or bf16-mixed / 16-mixed (GPU only) to autocast the base model (counts and bounds stay exact).
        channels_last: store a convolutional model's weights channels-last (NHWC): faster forward passes on
            CPU (benchmarks/README.md); the logits move by float rounding only. false: the layout it was trained in.
        compile: run the base model under torch.compile, one static batch shape (the last batch padded):
            auto (max-autotune on a CUDA GPU, none on CPU), none, default or max-autotune (README, "GPU").
        knn_backend: a kNN sigma's search (auto, faiss, torch; default: the checkpoint's): same sigma(x), not recorded.
        device: the older option: auto, cpu or cuda, an alias of accelerator.
    """

    split: Literal["test", "val", "train"] = "test"
    skip: PositiveInt = 1
    max: Optional[PositiveInt] = None
    out: Optional[str] = None
    compare: Optional[Union[str, list[str]]] = None
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: PositiveInt = 1
    num_nodes: PositiveInt = 1
    strategy: Optional[str] = None
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    channels_last: bool = True
    compile: Literal["auto", "none", "default", "max-autotune"] = "auto"
    knn_backend: Optional[Literal["auto", "faiss", "torch"]] = None
    device: Optional[Literal["auto", "cpu", "cuda"]] = None

    def __post_init__(self):
        CertifySettings.__post_init__(self)
        ReportOptions.__post_init__(self)


@dataclass
class WandbOptions:
    """Weights & Biases logging; the run folder goes inside the output folder.

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


@dataclass
class CertifyResult:
    """What :func:`certify` returns on every process: the folder, the rows of the selected points
    (``certify.tsv``'s columns as NumPy arrays) and the summary (as in ``summary.json``)."""

    out: Path
    rows: dict
    summary: dict


def _options(out, options: dict) -> CertifyOptions:
    names = {f.name for f in fields(CertifyOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"unknown certify option(s) {', '.join(unknown)}; the options are {', '.join(sorted(names))}")
    try:
        opts = CertifyOptions(**{**options, "out": None if out is None else str(out)})
    except ValueError as error:
        raise UsageError(f"--certify.{one_line(error)}") from None
    if opts.sequential and opts.radii is None and opts.radii_max is None:
        raise UsageError("--certify.sequential true needs the radius grid it decides on: --certify.radii "
                         "0.25,0.5,0.75,1.0 (or --certify.radii_max with --certify.radii_step)")
    return opts


def certify(ckpt_path, out=None, *, data: Optional[dict] = None, data_root: Optional[str] = None,
            wandb: Optional[WandbOptions] = None, **options) -> CertifyResult:
    """Certify the checkpoint ``ckpt_path`` into the folder ``out`` and return its rows and summary.

    Args:
        ckpt_path: a checkpoint written by ``fit``.
        out: output folder (default: one per checkpoint under ``certify/``); a rerun resumes it.
        data: a config's ``data:`` section replacing the checkpoint's data module (its class_path /
            init_args); ``data_root``: only the data root.
        wandb: :class:`WandbOptions` (default: an offline run inside ``out``).
        options: the fields of :class:`CertifyOptions` (n0, n, alpha, batch_size, seed, split, skip,
            max, sequential, radii, devices, num_nodes, precision, ...).

    Raises :class:`~lightning_idrs.arguments.UsageError` (a ValueError) for bad input, before the first
    point; KeyboardInterrupt on Ctrl-C or SIGTERM (the finished rows are kept: rerun to resume).
    """
    import torch.distributed

    from lightning_idrs.launching import launch

    opts, wandb = _options(out, options), wandb or WandbOptions()
    compare = read_compare(opts.compare)
    _check_folder(opts.out)
    fabric = launch(opts)
    opts = opts.for_device(fabric.device)  # the batch size and chunking that fill this device
    try:
        return _certify_launched(fabric, str(ckpt_path), data, data_root, opts, wandb, compare)
    finally:  # leave the process group before exiting: a live gloo group can abort the interpreter at exit
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _check_folder(out) -> None:
    """Checked here, not by a jsonargparse path type: ``out`` is also an argument of the Python API (no
    parser), and it may be new and nested (``Path_dc`` wants an existing parent)."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--certify.out {out} is a file, not a folder; name a folder (new or of an earlier run)")


def prepare(ckpt_path: str, data, data_root, opts: CertifyOptions, fabric):
    """(loaded checkpoint, data set, selected indices, settings, the base classifier to run): everything
    that determines the rows."""
    from lightning_idrs.checkpoint import comparable_sigma, load_checkpoint
    from lightning_idrs.compiling import compile_for_certification
    from lightning_idrs.reporting import decision_grid
    from lightning_idrs.smoothing import NOISE_VERSION, use_channels_last

    device = fabric.device
    loaded = load_checkpoint(ckpt_path, device, data=data, overrides={} if data_root is None else {"root": data_root},
                             sigma_options={"knn_backend": opts.knn_backend})
    model, datamodule = loaded.model, loaded.datamodule
    try:  # converted: the logits move by rounding, so the layout is recorded with the rows
        converted = opts.channels_last and use_channels_last(model.model, datamodule.input_shape, device)
    except ValueError as error:
        raise UsageError(f"{error}; use --certify.channels_last false") from None
    try:
        r = float(model.sigma.semi_elasticity)  # the r of the radius (input space)
    except ValueError as error:  # e.g. an approximate kNN index or an embedding without a Lipschitz bound
        raise UsageError(f"this checkpoint's sigma(x) cannot be certified: {one_line(error)}") from None
    dataset = datamodule.split_dataset(opts.split)
    selected = np.arange(0, len(dataset), opts.skip)[: opts.max]
    base, compiled = compile_for_certification(model.model, opts.compile, opts.largest_batch(), datamodule.input_shape,
                                               device, fabric.autocast, verbose=fabric.global_rank == 0)
    settings = {
        "checkpoint_sha256": loaded.sha256, "dataset": datamodule.name, "data_fingerprint": datamodule.fingerprint(),
        "split": opts.split, "split_fingerprint": datamodule.fingerprint(opts.split), "dim": model.input_dim,
        "sigma": comparable_sigma(model.hparams.sigma, model.sigma), "semi_elasticity": r, "noise": NOISE_VERSION,
        "precision": opts.precision, **({"memory_format": "channels_last"} if converted else {}),
        **({"compile": compiled} if compiled != "none" else {}),  # compiled: the logits move by rounding too
        **{name: getattr(opts, name) for name in ROW_SETTINGS},
    }
    if opts.sequential:  # the grid decides when a point stops: it is part of what determines the rows
        settings["radii"] = decision_grid(opts).tolist()
    return loaded, dataset, selected, settings, base


def default_out(ckpt_path: str, sha256: str, opts: CertifyOptions) -> Path:
    """certify/<checkpoint name>-<first 8 hex digits of its digest>_<split>_n<n>: one folder per checkpoint."""
    return Path("certify") / f"{Path(ckpt_path).stem}-{sha256[:8]}_{opts.split}_n{opts.n}"


def _certify_launched(fabric, ckpt_path, data, data_root, opts, wandb_opts, compare) -> CertifyResult:
    """Every process: load, agree, certify its share; rank 0 writes the rows, the summary and the report."""
    from contextlib import nullcontext

    from lightning_idrs.launching import agree
    from lightning_idrs.smoothing import SmoothedClassifier

    loaded, dataset, selected, settings, base = prepare(ckpt_path, data, data_root, opts, fabric)
    agree(fabric, {**settings, "selected": [len(selected), int(selected.sum())], "out": opts.out})
    model, rank0 = loaded.model, fabric.global_rank == 0
    out = Path(opts.out) if opts.out else default_out(ckpt_path, loaded.sha256, opts)
    _check_folder(out)
    if rank0:
        print(f"certify: {ckpt_path} ({model.sigma.label}, N={model.input_dim}) on {loaded.datamodule.name}/"
              f"{opts.split}, {len(selected)} points, n0={opts.n0}, n={opts.n}, alpha={opts.alpha:g}, "
              f"{fabric.world_size} process(es) on {fabric.device.type}, output {out}", flush=True)
    log, todo = open_log(fabric, out, settings, selected, opts)
    smoothed = SmoothedClassifier(base, model.sigma, model.hparams.num_classes, forward_context=fabric.autocast)
    with log if log is not None else nullcontext():
        start = time.perf_counter()
        new = certify_points(fabric, log, smoothed, dataset, todo, len(selected), opts, settings.get("radii"))
        elapsed = time.perf_counter() - start
        status = (_summarize(log, out, settings, selected, opts, ckpt_path, model, fabric, loaded.datamodule) if rank0
                  else None)
    from lightning_idrs.launching import collective

    with collective("sharing the summary"):
        status = fabric.broadcast(status, src=0)
    if status[0] == "error":
        raise UsageError(status[1])
    columns, summary = status[1], status[2]
    if rank0:
        checkpoint = {"path": str(ckpt_path), "sha256": loaded.sha256, "hparams": dict(model.hparams)}
        png = _report(out, summary, columns, compare, wandb_opts, settings, checkpoint)
        _print_summary(out, summary, new, elapsed, png)
    return CertifyResult(out, columns, summary)


def _storage_error(out: Path, error: OSError) -> UsageError:
    if error.errno == errno.ENOSPC:
        return UsageError(f"no space left on the disk of {out}: free space, then rerun the same command to resume "
                          "(the finished rows are kept)")
    return UsageError(f"cannot write to {out}: {error.strerror or one_line(error)}; rerun the same command to resume "
                      "once it is writable (the finished rows are kept)")


def open_log(fabric, out: Path, settings: dict, selected, opts: CertifyOptions):
    """Rank 0 opens (or resumes) the TSV log; every rank gets the same list of chunks of unfinished points."""
    from lightning_idrs.launching import collective
    from lightning_idrs.sharding import plan_chunks
    from lightning_idrs.tsv_log import TSV_NAME, CertifyLog

    log, status = None, None
    if fabric.global_rank == 0:
        try:
            _refuse_other_noise(out, settings["noise"])
            log = CertifyLog(out, settings)
        except UsageError as error:
            status = ("error", one_line(error))
        except OSError as error:
            status = ("error", one_line(_storage_error(out, error)))
        except (ValueError, RuntimeError) as error:
            status = ("error", one_line(error))
        else:
            if log.repaired:
                print(f"note: {out / TSV_NAME}: dropped a {log.repaired}", file=sys.stderr)
            todo = np.asarray([i for i in selected.tolist() if i not in log.done], dtype=np.int64)
            status = ("ok", plan_chunks(todo, opts.points_per_chunk))
    with collective("opening the output folder"):
        status = fabric.broadcast(status, src=0)
    if status[0] == "error":
        raise UsageError(status[1])
    return log, status[1]


def _refuse_other_noise(out: Path, version: str) -> None:
    """A folder whose rows came from another noise version cannot be extended: its rows would mix both."""
    import json

    from lightning_idrs.tsv_log import SETTINGS_NAME

    try:
        saved = json.loads((out / SETTINGS_NAME).read_text(encoding="utf-8")).get("noise")
    except (OSError, ValueError, AttributeError):
        return  # no folder yet, or CertifyLog reports what is wrong with it
    if saved != version:
        raise UsageError(f"{out} holds rows of the noise version {saved!r} of an earlier lightning_idrs; this one "
                         f"draws the noise of each point as {version!r}, so it cannot add rows to them: "
                         "use another --certify.out")


def certify_points(fabric, log, smoothed, dataset, todo: list, total: int, opts: CertifyOptions, radii) -> int:
    """Certify the chunks ``todo`` over all processes; rank 0 appends the new rows. Returns #new rows."""
    from tqdm import tqdm

    from lightning_idrs.launching import collective, fault_point
    from lightning_idrs.sharding import certify_sharded

    written, bar = 0, None
    try:
        with collective("certification stopped"):
            for rounds, rows in enumerate(certify_sharded(smoothed, dataset, todo, opts, fabric.device,
                                                          fabric.global_rank, fabric.world_size, radii), start=1):
                if log is not None:  # rank 0: one write (and fsync) per round of chunks
                    try:
                        written += log.append([row for row in rows.tolist() if int(row[0]) not in log.done])
                    except OSError as error:
                        raise _storage_error(log.out_dir, error) from None
                if bar is None:  # after the first round: an error before it stays one line
                    bar = tqdm(total=total, initial=total - sum(len(idx) for _, idx in todo), unit="pt",
                               desc="certify", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0,
                               file=sys.stderr, disable=fabric.global_rank != 0)
                bar.update(len(rows))
                fault_point(min(rounds * fabric.world_size, len(todo)))  # a testing hook; nothing when unset
    finally:
        if bar is not None:
            bar.close()
    return written


def _summarize(log, out, settings, selected, opts, ckpt_path, model, fabric, datamodule):
    """("ok", columns, summary) of exactly the selected points, or ("error", line)."""
    from lightning_idrs.reporting import DEFAULT_REPORT_RADII, decision_grid, merge_grids, radius_grid, report_radii

    report = report_radii(opts, getattr(datamodule, "report_radii", DEFAULT_REPORT_RADII))
    try:
        columns = log.columns(only=selected)  # sequential: the curve only where the stopping rule decided
        grid = (merge_grids(decision_grid(opts), report) if opts.sequential
                else radius_grid(opts, columns["radius"], report))
        stats = log.summarize(grid, model.hparams.num_classes, only=selected)
    except ValueError as error:
        return "error", one_line(error)
    summary = {**settings, "checkpoint": ckpt_path, "sigma_label": model.sigma.label, "skip": opts.skip, "max": opts.max,
               "batch_size": opts.batch_size, "points_per_chunk": opts.points_per_chunk,
               "device": fabric.device.type, "processes": fabric.world_size, "num_selected": int(len(selected)),
               "report_radii": report.tolist(), **stats}
    return "ok", columns, summary


def _report(out: Path, summary: dict, columns: dict, compare, wandb_opts: WandbOptions, settings: dict,
            checkpoint: dict) -> Path:
    """summary.json, the PNG (with the compare curve) and W&B; returns the PNG's path."""
    from lightning_idrs.reporting import (PLOT_NAME, SUMMARY_NAME, curve, curve_from_tsv_columns, keep_run_files_under,
                                          plot_curves, write_summary)
    from lightning_idrs.wandb_logging import log_certify_run

    try:
        keep_run_files_under(out, wandb=False)
        write_summary(out / SUMMARY_NAME, summary)
        curves = {summary["sigma_label"]: curve(summary)}
        for label, columns_ in compare:  # labels are unique among themselves; not always against this run's
            label = label if label not in curves else f"{label} [compare]"
            curves[label] = (np.asarray(summary["radii"]), curve_from_tsv_columns(columns_, summary["radii"]))
        title = f"{summary['dataset']} {summary['split']}: n={summary['n']}, alpha={summary['alpha']:g}"
        png = plot_curves(curves, out / PLOT_NAME, title=title)
    except OSError as error:
        raise _storage_error(out, error) from None
    if wandb_opts.mode != "disabled":  # the one place a finished run goes to W&B
        try:
            log_certify_run(out, summary, columns, settings, settings["sigma"], checkpoint, asdict(wandb_opts),
                            png=png, curves=curves)
        except Exception as error:  # the results are on disk; a logging failure must not hide them
            print(f"warning: W&B logging failed: {one_line(error)[:300]}", file=sys.stderr)
    return png


def _print_summary(out: Path, summary: dict, new: int, elapsed: float, png: Path) -> None:
    from lightning_idrs.reporting import SUMMARY_NAME
    from lightning_idrs.tsv_log import TSV_NAME

    from lightning_idrs.statistics import radius_key

    accuracy, shown = summary["certified_accuracy"], [radius_key(r) for r in summary["report_radii"]]  # the report grid
    print(f"certified {new} new point(s) in {elapsed:.1f} s; {summary['num_points']} in {out / TSV_NAME}")
    print("certified accuracy: " + ", ".join(f"R={k}: {accuracy[k]:.3f}" for k in shown))
    print(f"ACR {summary['acr']:.4f}, abstain rate {summary['abstain_rate']:.3f}, "
          f"smoothed clean accuracy {summary['clean_accuracy']:.3f}; estimation samples {summary['total_samples']:,} "
          f"({summary['mean_samples']:,.0f} per point)")
    print(f"wrote {out / SUMMARY_NAME} and {png}", flush=True)
