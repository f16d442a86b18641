"""Writes docs/results/<config>.md and its figures from the finished runs of scripts/study.py.

Per setting (sigma_b, RS or IDRS r, objective) the mean +- std over seeds; paired differences over the
same seeds (IDRS - RS, consistency - gaussian) with a 95% t-interval; the waterfall, the
accuracy / robustness trade-off (a figure) and class-wise worst-class accuracy and best-worst gap.
The section between the reading markers is kept when the report is rewritten.
"""
import json
import platform
import re
from collections import defaultdict

import numpy as np
from scipy import stats

from lightning_idrs.tsv_log import TSV_NAME, read_tsv

READING = re.compile(r"<!-- reading -->.*<!-- /reading -->", re.S)
TABLE_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
METRICS = ("acr", "acc@0", "acc@0.25", "acc@0.5", "acc@1", "worst@0.25", "worst@0.5", "gap@0.25", "gap@0.5")


def _key(r) -> str:
    return f"{r:g}"


def load_runs(args, specs) -> list:
    """(spec, metrics, summary) of every run whose certification finished, in the order of ``specs``."""
    runs = []
    for spec in specs:
        folder = args.out / spec["name"]
        summary_path = folder / "certify" / "summary.json"
        record_path = folder / "run.json"
        if not (summary_path.is_file() and record_path.is_file()):
            continue
        record = json.loads(record_path.read_text())
        if "certified" not in record:
            continue
        summary = json.loads(summary_path.read_text())
        tsv = read_tsv(folder / "certify" / TSV_NAME)
        runs.append((spec, metrics_of(summary, tsv), summary, record))
    return runs


def metrics_of(summary, tsv) -> dict:
    acc = summary["certified_accuracy"]
    correct = tsv["correct"] == 1
    out = {"acr": summary["acr"], "max_radius": float(tsv["radius"][correct].max()) if correct.any() else 0.0,
           "sigma_range": (float(tsv["sigma"].min()), float(tsv["sigma"].max()))}
    for r in TABLE_RADII:
        out[f"acc@{_key(r)}"] = acc.get(_key(r), float("nan"))
    classes = summary["class_certified_accuracy"]
    for r in (0.25, 0.5):
        values = [per[_key(r)] for per in classes.values()]
        out[f"worst@{_key(r)}"], out[f"gap@{_key(r)}"] = min(values), max(values) - min(values)
    out["zero_at"] = next((r for r in TABLE_RADII if acc.get(_key(r), 0.0) == 0.0), None)
    return out


def method(spec) -> str:
    return "RS" if spec["r"] == 0 else f"IDRS r={spec['r']:g}"


def group(runs) -> dict:
    """{(sigma_b, r, objective): {seed: metrics}}."""
    out = defaultdict(dict)
    for spec, metrics, _, _ in runs:
        out[(spec["sigma_base"], spec["r"], spec["objective"])][spec["seed"]] = metrics
    return out


def mean_std(values) -> str:
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if len(values) == 0:
        return "-"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def paired(a: dict, b: dict, metric: str):
    """(mean of a - b over the seeds both have, 95% t-interval (lo, hi), seeds), or None with < 2 seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diff = np.array([a[s][metric] - b[s][metric] for s in seeds], dtype=float)
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return diff.mean(), (diff.mean() - half, diff.mean() + half), len(seeds)


def comparisons(groups) -> list:
    """[(label, a settings' seeds, b settings' seeds)]: IDRS r - RS per objective, consistency - gaussian per method."""
    out = []
    for (sigma_base, r, objective), seeds in sorted(groups.items()):
        if r > 0 and (sigma_base, 0.0, objective) in groups:
            out.append((f"sb {sigma_base:g}, {objective}: IDRS r={r:g} - RS", seeds, groups[(sigma_base, 0.0, objective)]))
    for (sigma_base, r, objective), seeds in sorted(groups.items()):
        if objective == "consistency" and (sigma_base, r, "gaussian") in groups:
            label = "RS" if r == 0 else f"IDRS r={r:g}"
            out.append((f"sb {sigma_base:g}, {label}: consistency - gaussian", seeds, groups[(sigma_base, r, "gaussian")]))
    return out


def resolved(result) -> bool:
    """The interval excludes 0 and has a width: equal differences on every seed (a zero-width interval,
    e.g. one point of a 10-point class) are no evidence of a systematic effect."""
    return result is not None and result[1][1] - result[1][0] > 1e-9 and (result[1][0] > 0 or result[1][1] < 0)


def _fmt_diff(result) -> str:
    if result is None:
        return "-"
    mean, (lo, hi), _ = result
    mark = " **" if resolved(result) else " (=)" if hi - lo <= 1e-9 and abs(mean) > 1e-9 else ""
    return f"{mean + 0.0:+.3f} [{lo + 0.0:+.3f}, {hi + 0.0:+.3f}]{mark}"


def accuracy_table(groups) -> list:
    head = ("| sigma_b | method | objective | seeds | " + " | ".join(f"R={_key(r)}" for r in TABLE_RADII)
            + " | ACR | sigma(x) / sigma_b |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (sigma_base, r, objective), seeds in sorted(groups.items()):
        cells = [mean_std([m[f"acc@{_key(R)}"] for m in seeds.values()]) for R in TABLE_RADII]
        low = min(m["sigma_range"][0] for m in seeds.values()) / sigma_base
        high = max(m["sigma_range"][1] for m in seeds.values()) / sigma_base
        lines.append(f"| {sigma_base:g} | {method({'r': r})} | {objective} | {len(seeds)} | " + " | ".join(cells)
                     + f" | {mean_std([m['acr'] for m in seeds.values()])} | {low:.3f} - {high:.3f} |")
    return lines


def difference_table(groups) -> list:
    lines = ["| comparison (a - b, same seeds) | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for label, a, b in comparisons(groups):
        results = [paired(a, b, metric) for metric in METRICS]
        seeds = next((res[2] for res in results if res), 0)
        lines.append(f"| {label} | {seeds} | " + " | ".join(_fmt_diff(res) for res in results) + " |")
    return lines


def waterfall_table(groups) -> list:
    lines = ["| sigma_b | method | objective | R_top | cert. acc. at R_top | largest radius | falls to 0 at (per seed) |",
             "|---|---|---|---|---|---|---|"]
    for sigma_base in sorted({key[0] for key in groups}):
        block = {key: seeds for key, seeds in groups.items() if key[0] == sigma_base}
        reached = [R for R in TABLE_RADII if any(np.mean([m[f"acc@{_key(R)}"] for m in s.values()]) > 0
                                                 for s in block.values())]
        top = max(reached) if reached else 0.0
        for (_, r, objective), seeds in sorted(block.items()):
            zero = ", ".join("> 2" if m["zero_at"] is None else _key(m["zero_at"]) for m in seeds.values())
            lines.append(f"| {sigma_base:g} | {method({'r': r})} | {objective} | {_key(top)} | "
                         f"{mean_std([m[f'acc@{_key(top)}'] for m in seeds.values()])} | "
                         f"{mean_std([m['max_radius'] for m in seeds.values()])} | {zero} |")
    return lines


def class_table(groups) -> list:
    lines = ["| sigma_b | method | objective | worst class R=0.25 | gap R=0.25 | worst class R=0.5 | gap R=0.5 |",
             "|---|---|---|---|---|---|---|"]
    for (sigma_base, r, objective), seeds in sorted(groups.items()):
        cells = [mean_std([m[k] for m in seeds.values()]) for k in ("worst@0.25", "gap@0.25", "worst@0.5", "gap@0.5")]
        lines.append(f"| {sigma_base:g} | {method({'r': r})} | {objective} | " + " | ".join(cells) + " |")
    return lines


def findings(groups) -> list:
    """Which paired differences have a 95% interval that excludes 0 (all others: not resolved)."""
    outside, inside = [], 0
    for label, a, b in comparisons(groups):
        for metric in ("acr", "acc@0", "acc@0.25", "acc@0.5", "worst@0.25", "worst@0.5"):
            result = paired(a, b, metric)
            if result is None:
                continue
            if resolved(result):
                outside.append(f"* {label}, {metric}: {_fmt_diff(result).rstrip(' *')}")
            else:
                inside += 1
    head = [f"{len(outside)} of {len(outside) + inside} paired differences (ACR, certified accuracy at R = 0, 0.25, "
            "0.5, worst class at 0.25, 0.5) have a 95% interval that excludes 0:", ""]
    return head + (outside or ["* none"])


def figures(groups, report, config) -> list:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sigmas = sorted({key[0] for key in groups})
    names = []
    for kind in ("curves", "tradeoff"):
        fig = Figure(figsize=(4.2 * len(sigmas), 3.8), dpi=110)
        FigureCanvasAgg(fig)
        for i, sigma_base in enumerate(sigmas):
            ax = fig.add_subplot(1, len(sigmas), i + 1)
            for (sb, r, objective), seeds in sorted(groups.items()):
                if sb != sigma_base:
                    continue
                label, style = f"{method({'r': r})}, {objective}", "-" if objective == "gaussian" else "--"
                if kind == "curves":
                    acc = np.array([[m[f"acc@{_key(R)}"] for R in TABLE_RADII] for m in seeds.values()])
                    ax.errorbar(TABLE_RADII, acc.mean(0), yerr=acc.std(0), ls=style, marker=".", capsize=2, label=label)
                else:
                    x = [m["acc@0"] for m in seeds.values()]
                    y = [m["acr"] for m in seeds.values()]
                    ax.scatter(x, y, s=10, alpha=0.5, marker="o" if objective == "gaussian" else "^")
                    ax.errorbar(np.mean(x), np.mean(y), xerr=np.std(x), yerr=np.std(y), marker="o" if objective ==
                                "gaussian" else "^", ms=7, capsize=2, label=label)
            ax.set_title(f"{config}, sigma_b = {sigma_base:g}")
            ax.set_xlabel("radius R" if kind == "curves" else "certified accuracy at R = 0")
            ax.set_ylabel("certified accuracy (mean ± std over seeds)" if kind == "curves" else "ACR")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        names.append(f"{config}_{kind}.png")
        fig.savefig(str(report / names[-1]))
    return names


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        found = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = f"{found[0]} x {len(found)} cores" if found else cpu
    except OSError:
        pass
    gpu = "no GPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    return f"{cpu}, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def header(args, runs, specs) -> list:
    summary = runs[0][2]
    fit_s = sum(rec.get("fit_s", 0) for *_, rec in runs)
    cert_s = sum(rec.get("certify_s", 0) for *_, rec in runs)
    missing = [spec["name"] for spec in specs if spec["name"] not in {s["name"] for s, *_ in runs}]
    return [
        f"Written by `python scripts/study.py {args.command_flags}` on {_machine()}.",
        f"{len(runs)} of {len(specs)} runs finished" + (f" (missing: {', '.join(missing)})." if missing else "."),
        f"Compute: {fit_s / 60:.0f} min of training and {cert_s / 60:.0f} min of certification (summed over runs).",
        "",
        f"* Training: `python -m lightning_idrs fit --config {args.config}`, base model `{args.arch}`, {args.epochs} "
        "epochs, the checkpoint with the best noisy validation accuracy; seeds " + ", ".join(map(str, args.seeds))
        + " (`--seed_everything`); the data split is the same in every run.",
        f"* Data: `{summary['dataset']}`, training-set fingerprint `{summary['data_fingerprint'][:16]}...`, test "
        f"split `{summary['split_fingerprint'][:16]}...`; certified: {summary['num_points']} test points (every "
        f"{args.skip}-th of the test split), the same in every run.",
        f"* Certification: `python -m lightning_idrs certify --certify.sequential true`, grid R = 0, 0.25, ..., 2.0, "
        f"n = {summary['n']:,} at most, alpha = {summary['alpha']:g}. The grid accuracies equal fixed-n ones; ACR "
        "is the mean radius where each point stopped (below a fixed-n ACR, docs/math.md).",
        f"* W&B: every run in group `{args.group}` (offline run folders inside the run folders).",
        "* ± is the standard deviation over seeds; [lo, hi] a 95% t-interval of the paired difference over the "
        "same seeds; ** marks an interval that excludes 0; (=) the same non-zero difference on every seed (an "
        "interval of width 0, which says nothing about the spread).",
    ]


def write_report(args, specs) -> None:
    runs = load_runs(args, specs)
    if not runs:
        print("no finished runs: no report written")
        return
    args.report.mkdir(parents=True, exist_ok=True)
    groups = group(runs)
    pictures = figures(groups, args.report, args.config)
    lines = [f"# {args.config}: RS vs IDRS x training objective, {len(args.seeds)} seeds", "", *header(args, runs, specs),
             "", "## Certified accuracy (mean ± std over seeds)", "", *accuracy_table(groups),
             "", "## Paired differences (same seeds)", "",
             "`worst@R`: the worst class's certified accuracy at R; `gap@R`: best minus worst class.", "",
             *difference_table(groups), "", *findings(groups),
             "", "## The waterfall", "",
             "R_top: the largest grid radius at which some setting of that sigma_b keeps certified accuracy > 0; "
             "largest radius: the largest certified radius of any point.", "", *waterfall_table(groups),
             "", "## Class-wise unfairness", "", *class_table(groups),
             "", "## Figures", "", *[f"![{name}]({name})" for name in pictures], "", "## Reading", ""]
    path = args.report / f"{args.config}.md"
    old = path.read_text() if path.is_file() else ""
    kept = READING.search(old)
    lines.append(kept.group(0) if kept else "<!-- reading -->\n(to be written after looking at the numbers)\n"
                                            "<!-- /reading -->")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
