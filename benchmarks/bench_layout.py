"""Forward-pass time per sample by weight layout, batch size and precision: what to pass to `certify`.

    python benchmarks/bench_layout.py                                   # digits CNN, ResNet-20, ResNet-110 on CPU
    python benchmarks/bench_layout.py --arch resnet110 --batch 100 1000 --device cuda

Prints microseconds per sample (best of interleaved rounds, the order alternating) for the default
(contiguous) weights, channels-last weights (`--certify.channels_last true`, the default) and
channels-last under bf16 autocast (`--certify.precision bf16-mixed`); and the ratio contiguous /
channels-last. Random weights and inputs: the time of a forward pass does not depend on them.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_certify import random_model  # noqa: E402

SHAPES = {"small_cnn": (1, 8, 8), "lenet": (1, 28, 28)}


def per_sample(model, x, device, bf16):
    context = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else torch.autocast(
        torch.device(device).type, enabled=False)
    with torch.inference_mode(), context:
        start = time.perf_counter()
        model(x).argmax(1).cpu()
        return (time.perf_counter() - start) / len(x) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["small_cnn", "resnet20", "resnet110"])
    parser.add_argument("--batch", nargs="+", type=int, default=[100, 400, 1000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; us per sample, "
          f"best of {args.rounds} interleaved rounds", flush=True)
    for arch in args.arch:
        shape = SHAPES.get(arch, (3, 32, 32))
        models = {"contiguous": random_model(arch, shape, args.device, channels_last=False),
                  "channels-last": random_model(arch, shape, args.device)}
        for batch in args.batch:
            x = torch.rand(batch, *shape, device=args.device)
            runs = [("contiguous", False), ("channels-last", False), ("channels-last", True)]
            best = [math.inf] * len(runs)
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for i in (range(len(runs)) if round_ % 2 else reversed(range(len(runs)))):
                    seconds = per_sample(models[runs[i][0]], x, args.device, runs[i][1])
                    best[i] = min(best[i], seconds) if round_ else best[i]
            print(f"{arch:>10} batch {batch:>5}: contiguous {best[0]:8.1f}  channels-last {best[1]:8.1f}  "
                  f"channels-last bf16 {best[2]:8.1f}  (contiguous / channels-last {best[0] / best[1]:.2f}, "
                  f"fp32 / bf16 {best[1] / best[2]:.2f})", flush=True)


if __name__ == "__main__":
    main()
