"""Certification throughput on a GPU: eager and compiled floors, ours eager and compiled, a per-point loop.

    python benchmarks/bench_gpu.py               # the preset of scripts/gpu_check.sh: about 2 min on an H200
    python benchmarks/bench_gpu.py --full        # every batch size and precision compiled too (~10 min: 1+ min a shape)
    python benchmarks/bench_gpu.py --device cpu  # tiny sizes (ResNet-20, batches of 50 / 100): checks the script

ResNet-110 (CIFAR's 3x32x32, random weights, channels-last as ``certify`` runs it), samples per second of:

* eager floor: bare forward passes on noisy batches (x[owner] + sigma * randn, then argmax), no bookkeeping;
* compiled floor: the same through the compiled model ``certify`` uses (``--certify.compile``: max-autotune,
  i.e. torch's max-autotune-no-cudagraphs, one static batch shape);
* ours: ``certify_chunks`` (the certify path: per-point noise streams, counts, bounds, radii) on the same
  samples, eager and compiled;
* per-point loop: one point at a time in the style of Cohen et al.'s ``code/core.py`` (fp32, the model as
  trained), against ours at the same batch size.

Each measurement certifies ``--points`` points at n0 = 100 and ``--n`` (the floor runs the same number of
samples, in the same batches); per compiled configuration it also counts the noisy samples whose top class
differs between the eager and the compiled model on one batch. Targets (issue 25): ours compiled >= 2.2x the
eager floor at batch 4,000+, and ours compiled / compiled floor >= 1 / 1.10.
"""
import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_certify import cohen_loop, floor, random_model, timed  # noqa: E402

from lightning_idrs import CertifySettings, ConstantSigma, SmoothedClassifier, certify_chunks  # noqa: E402
from lightning_idrs.compiling import compile_for_certification  # noqa: E402
from lightning_idrs.sharding import plan_chunks  # noqa: E402

SHAPE = (3, 32, 32)


def context_of(precision, device):
    if precision == "bf16":
        return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext


def measure(model, precision, batch, n, args):
    """(floor samples/s, ours samples/s) of ``model`` (eager or compiled) at ``batch`` samples per pass."""
    device, context = args.device, context_of(precision, args.device)
    x = torch.rand(args.points, *SHAPE, device=device)
    sigma = torch.full((args.points,), 0.25, device=device)
    smoothed = SmoothedClassifier(model, ConstantSigma(0.25), num_classes=10, forward_context=context)
    settings = CertifySettings(n0=100, n=n, batch_size=batch, points_per_chunk=args.points)
    data = [(x[i].cpu(), 0) for i in range(args.points)]
    chunks = plan_chunks(np.arange(args.points), args.points)
    samples = args.points * (100 + n)
    warm = CertifySettings(n0=100, n=max(1, batch // args.points), batch_size=batch, points_per_chunk=args.points)
    list(certify_chunks(smoothed, data, chunks, warm, device))  # warm-up: kernels chosen, memory allocated
    t_floor = timed(lambda: floor(model, x, 100 + n, batch, sigma, device, context), args.repeats)[0]
    t_ours = timed(lambda: list(certify_chunks(smoothed, data, chunks, settings, device)), args.repeats)[0]
    return samples / t_floor, samples / t_ours


def flips(eager, compiled, precision, batch, device):
    """Noisy samples of one batch whose top class differs between the eager and the compiled model."""
    noisy = torch.rand(1, *SHAPE, device=device) + 0.25 * torch.randn(batch, *SHAPE, device=device)
    with torch.inference_mode(), context_of(precision, device)():
        return int((eager(noisy).argmax(1) != compiled(noisy).argmax(1)).sum())


def per_point_loop(args, batch):
    """Samples/s of the per-point loop (the model as trained: contiguous weights) and of ours, fp32."""
    as_trained = random_model(args.arch, SHAPE, args.device, channels_last=False)
    x = torch.rand(2, *SHAPE, device=args.device)
    n = min(args.n, 10_000)
    cohen_loop(as_trained, x[:1], 100, batch, batch, 0.25, 0.001)  # warm-up
    seconds = timed(lambda: cohen_loop(as_trained, x, 100, n, batch, 0.25, 0.001), args.repeats)[0]
    return 2 * (100 + n) / seconds


def presets(args):
    """(eager configurations, compiled configurations) as [(precision, batch)]."""
    eager = [(p, b) for p in args.precision for b in args.batch]
    if args.compiled is not None:
        compiled = [(item.split(":")[0], int(item.split(":")[1])) for item in args.compiled]
    else:
        compiled = eager if args.full else [("bf16", max(args.batch))]
    return eager, compiled


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="compile every batch size and precision")
    parser.add_argument("--arch", default=None, help="default resnet110 on a GPU, resnet20 on CPU")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default 1000 4000 16000 (CPU: 50 100)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--compiled", nargs="+", default=None, metavar="PRECISION:BATCH",
                        help="the compiled configurations (default: bf16 at the largest batch; --full: all)")
    parser.add_argument("--mode", default=None, help="compile mode (default max-autotune on a GPU, default on CPU)")
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--n", type=int, default=None, help="samples per point, eager (default 5,000; CPU 200)")
    parser.add_argument("--compiled-n", type=int, default=None, help="... compiled (default 30,000; CPU 400)")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.arch = args.arch or ("resnet110" if gpu else "resnet20")
    args.batch = args.batch or ([1000, 4000, 16000] if gpu else [50, 100])
    args.mode = args.mode or ("max-autotune" if gpu else "default")
    args.n = args.n or (5_000 if gpu else 200)
    args.compiled_n = args.compiled_n or (30_000 if gpu else 400)
    args.points = args.points if gpu else min(args.points, 2)
    args.repeats = 1 if gpu else 2  # a GPU of its own times steadily; a shared CPU does not
    return args


def main():
    args = parse()
    start = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, device {args.device} ({name}), {args.arch} {SHAPE}, channels-last weights, "
          f"{args.points} points, n0 = 100, n = {args.n:,} eager / {args.compiled_n:,} compiled; samples/s", flush=True)
    eager_configs, compiled_configs = presets(args)
    model = random_model(args.arch, SHAPE, args.device)
    eager = {}  # (precision, batch) -> (eager floor, ours eager)
    for precision, batch in eager_configs:
        eager[precision, batch] = floor_rate, ours = measure(model, precision, batch, args.n, args)
        print(f"{precision:>4} batch {batch:>6,}: eager floor {floor_rate:>9,.0f}  ours eager {ours:>9,.0f} "
              f"(time ours / floor {floor_rate / ours:.3f})", flush=True)
    for precision, batch in compiled_configs:
        torch._dynamo.reset()
        began = time.perf_counter()
        compiled, mode = compile_for_certification(model, args.mode, batch, SHAPE, args.device,
                                                   context_of(precision, args.device))
        seconds = time.perf_counter() - began
        eager_floor = (eager.get((precision, batch)) or measure(model, precision, batch, args.n, args))[0]
        compiled_floor, ours = measure(compiled, precision, batch, args.compiled_n, args)
        print(f"{precision:>4} batch {batch:>6,}: compiled ({mode}, {seconds:.0f} s to compile) floor "
              f"{compiled_floor:>9,.0f} ({compiled_floor / eager_floor:.2f}x the eager floor)  ours compiled "
              f"{ours:>9,.0f} ({ours / eager_floor:.2f}x the eager floor, target >= 2.2; time ours / compiled floor "
              f"{compiled_floor / ours:.3f}, target <= 1.10); top class differs on "
              f"{flips(model, compiled, precision, batch, args.device)} of {batch:,} noisy samples", flush=True)
    batch = min(args.batch, key=lambda b: abs(b - 1000))
    loop = per_point_loop(args, batch)
    ours = eager.get(("fp32", batch), (None, None))[1]
    print(f"fp32 batch {batch:>6,}: per-point loop (Cohen et al.'s core.py) {loop:>9,.0f}"
          + (f"  vs ours eager {ours:,.0f} ({ours / loop:.2f}x)" if ours else ""), flush=True)
    print(f"bench_gpu: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
