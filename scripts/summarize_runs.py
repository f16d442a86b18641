"""A markdown table of the certify runs under a folder (OUT/<setting>/certify/summary.json): reproduce.sh's report.

    python scripts/summarize_runs.py runs/cifar10 [--title TEXT] [--cohen]

``--cohen`` adds Cohen et al.'s published CIFAR-10 certified accuracies as reference rows.
"""
import argparse
import json
from pathlib import Path

GRID = ("0", "0.25", "0.5", "0.75", "1")
#: Cohen et al. (2019), CIFAR-10, ResNet-110, n = 100,000, every 20th test image (their Table / Fig. 7).
COHEN = {0.12: (None, 0.59, 0.0, 0.0, 0.0), 0.25: (None, 0.60, 0.43, 0.27, 0.0), 0.5: (None, 0.55, 0.41, 0.32, 0.23)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--title", default="certified accuracy")
    parser.add_argument("--cohen", action="store_true")
    args = parser.parse_args()
    lines = [f"# {args.title}", "", "| setting | points | R=0 | R=0.25 | R=0.5 | R=0.75 | R=1.0 | ACR |",
             "|---|---|---|---|---|---|---|---|"]
    for path in sorted(args.folder.glob("*/certify/summary.json")):
        summary = json.loads(path.read_text())
        acc = summary["certified_accuracy"]
        lines.append(f"| {path.parent.parent.name} | {summary['num_points']} | "
                     + " | ".join(f"{acc[r]:.3f}" if r in acc else "-" for r in GRID) + f" | {summary['acr']:.4f} |")
    if args.cohen:
        for sigma, row in COHEN.items():
            lines.append(f"| Cohen et al. 2019, sigma {sigma:g} (published) | 500 | "
                         + " | ".join("-" if a is None else f"{a:.2f}" for a in row) + " | - |")
    report = args.folder / "results.md"
    report.write_text("\n".join(lines) + "\n")
    print(report.read_text())


if __name__ == "__main__":
    main()
