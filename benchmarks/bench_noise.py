"""Certification's noise generator (Philox4x32-10, lightning_idrs.philox) against torch.randn.

    python benchmarks/bench_noise.py                                   # CPU, CIFAR-shaped samples
    python benchmarks/bench_noise.py --device cuda --batch 16000       # GPU: eager and compiled
    python benchmarks/bench_noise.py --device cuda --batch 16000 --arch resnet110   # and the forward pass
    python benchmarks/bench_noise.py --shape 1 8 8 --batch 1000        # digits-shaped
    python benchmarks/bench_noise.py --certify small_cnn --shape 1 8 8   # certify with the previous noise vs this

Prints noise samples per second (one sample = one noisy copy of an input of --shape) for torch.randn
(what the noise cost before), the generator as certify draws it (NumPy on CPU; torch.compile on CUDA)
and the other way (torch eager on either device; compiled on CPU with --compile-cpu, which needs a
C++ compiler and takes a minute to compile), and the ratios. With --arch, also the base model's
forward pass on a batch, and the noise's time as a share of it. On CUDA it checks too that eager,
compiled and CPU noise agree (the same integers; float32 values that differ, if any). With --certify,
CERTIFY on random points with this noise and with the previous one (point-seeded-v2: torch.randn per
block of 1,000 samples), interleaved, best of --repeats: what the new noise costs a certification.
"""
import argparse
import math
import time

import numpy as np
import torch

from lightning_idrs import ConstantSigma, SmoothedClassifier, philox
from lightning_idrs.smoothing import PointNoise


class PreviousNoise(PointNoise):
    """The noise before point-philox-v3: block b of phase p of a point drawn by torch's generator, seeded with
    the b-th word of SeedSequence([seed, point, p]) (kept here to measure what the new noise costs)."""

    def batches(self, x, num, batch_size, phase):
        generator, block, cached, seeds = torch.Generator(device=x.device), None, None, {}
        total = len(x) * num
        for start in range(0, total, batch_size):
            end, pieces, pos = min(start + batch_size, total), [], start
            while pos < end:
                i, j = divmod(pos, num)
                b, offset = divmod(j, 1000)
                if block != (i, b):
                    if i not in seeds:
                        seeds = {i: np.random.SeedSequence([self.seed, int(self.keys[i]), phase]).generate_state(
                            -(-num // 1000), np.uint64) >> np.uint64(1)}
                    generator.manual_seed(int(seeds[i][b]))
                    size = min(1000, num - b * 1000)
                    block, cached = (i, b), torch.randn((size, *x.shape[1:]), generator=generator, device=x.device,
                                                        dtype=x.dtype)
                take = min(end - pos, len(cached) - offset)
                pieces.append(cached[offset:offset + take])
                pos += take
            yield torch.arange(start, end, device=x.device) // num, torch.cat(pieces)


def wall(function, device) -> float:
    """Wall time of one call (the GPU's queue drained before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(function, device, repeats):
    """Best wall time of ``repeats`` calls (after one warm-up call, whose time is returned too)."""
    first = wall(function, device)
    return min(wall(function, device) for _ in range(repeats)), first


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 32, 32], help="one noise sample's shape")
    parser.add_argument("--batch", type=int, default=None, help="samples per forward batch (default 1,000 on "
                        "CPU, 16,000 on CUDA)")
    parser.add_argument("--points", type=int, default=16, help="points sharing a batch (samples split evenly)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-cpu", action="store_true", help="also time torch.compile on CPU")
    parser.add_argument("--arch", default=None, help="also time this model's forward pass (random weights)")
    parser.add_argument("--certify", default=None, metavar="ARCH", help="certify with this model (random "
                        "weights, channels-last), the previous noise against this one")
    parser.add_argument("--n", type=int, default=2000, help="estimation samples for --certify (n0 = 100)")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (16_000 if device.type == "cuda" else 1000)
    shape = tuple(args.shape)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; batch {batch} x {shape} = {batch * math.prod(shape) / 1e6:.1f}M normals", flush=True)
    points = (torch.arange(batch) * args.points // batch).to(device)
    samples = torch.arange(batch) % max(1, batch // args.points)

    def draw(compiled):
        return lambda: philox.normals(7, points, 1, samples, shape, torch.float32, compiled=compiled)

    ways = {"torch.randn": lambda: torch.randn((batch, *shape), device=device)}
    if device.type == "cuda":
        ways["philox compiled (certify's)"] = draw(True)
        ways["philox eager"] = draw(False)
    else:
        ways["philox NumPy (certify's)"] = draw(None)
        ways["philox torch eager"] = draw(False)
        if args.compile_cpu:
            ways["philox compiled"] = draw(True)
    best = {}
    for name, function in ways.items():
        best[name], first = timed(function, device, args.repeats)
        print(f"{name:30s} {batch / best[name]:14,.0f} samples/s  ({best[name] * 1e3:8.2f} ms a batch; "
              f"first call {first:.2f} s)", flush=True)
    floor = best["torch.randn"]
    for name in best:
        if name != "torch.randn":
            print(f"{name} / torch.randn: {best[name] / floor:.2f}x the time")
    if args.arch:
        from lightning_idrs.models import build_model

        model = build_model(args.arch, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0]).to(device).eval()
        x = torch.randn((batch, *shape), device=device)
        with torch.inference_mode():
            forward, _ = timed(lambda: model(x), device, args.repeats)
        print(f"{args.arch} forward pass: {forward * 1e3:.2f} ms a batch ({batch / forward:,.0f} samples/s)")
        for name in best:
            print(f"  {name}: {100 * best[name] / forward:.1f}% of a forward pass")
    if args.certify:
        certify_both(args, device, batch, shape)
    if device.type == "cuda":
        cpu = philox.normals(7, points.cpu(), 1, samples, shape, torch.float32)
        for compiled in (True, False):
            gpu = philox.normals(7, points, 1, samples, shape, torch.float32, compiled=compiled).cpu()
            differ = int((gpu != cpu).sum())
            print(f"{'compiled' if compiled else 'eager'} CUDA vs CPU: {differ} of {cpu.numel():,} float32 values "
                  f"differ, max |difference| {float((gpu - cpu).abs().max()):.3g}")


def certify_both(args, device, batch, shape):
    from lightning_idrs.models import build_model
    from lightning_idrs.smoothing import use_channels_last

    torch.manual_seed(0)
    model = build_model(args.certify, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0]).to(device).eval()
    use_channels_last(model, shape, device)
    smoothed = SmoothedClassifier(model, ConstantSigma(0.25), 10)
    x = torch.rand(args.points, *shape, device=device)
    runs = {name: (lambda kind=kind: smoothed.certify(x, 100, args.n, 0.001, batch, kind(0, np.arange(args.points))))
            for name, kind in (("previous noise", PreviousNoise), ("this noise", PointNoise))}
    for run in runs.values():  # warm-up (compilation on CUDA)
        run()
    best = {name: math.inf for name in runs}
    for round_ in range(args.repeats):  # interleaved, alternating order: load that comes and goes hits both
        for name in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):
            best[name] = min(best[name], wall(runs[name], device))
    print(f"certify {args.certify}, {args.points} points, n0 = 100, n = {args.n}, batch {batch}: previous noise "
          f"{best['previous noise']:.3f} s, this noise {best['this noise']:.3f} s "
          f"(x{best['this noise'] / best['previous noise']:.2f})")


if __name__ == "__main__":
    main()
