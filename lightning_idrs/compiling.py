"""The base classifier under ``torch.compile``: the modes, one static batch shape, failures as one line.

* Modes (:data:`COMPILE_MODES`): ``none`` (eager), ``default`` and ``max-autotune``, which runs torch's
  ``max-autotune-no-cudagraphs``: kernels chosen by timing, without CUDA graphs (torch's
  ``reduce-overhead`` gave no gain over ``default`` at 4,000+ samples per batch, and CUDA graphs hold a
  memory pool of their own). ``auto`` (what ``certify`` does when told nothing) is ``max-autotune`` on a
  CUDA device and ``none`` elsewhere: on an H200 it ran ResNet-110 at 2.6x the eager floor, after about
  74 s of compiling, which a certify job at n = 100,000 earns back within ~110 points (README, "GPU").
* :class:`CompiledModel`: ``model`` under torch.compile; with a ``batch_size`` every forward pass gets
  exactly that many rows (a shorter batch is padded with zeros and the padding's logits are dropped
  before anything counts them or checks them for NaN), so certification compiles one shape, once.
  Any failure of the compiler is a :class:`CompileError` (one ``error:`` line naming the fix).
* :func:`compile_for_certification`: the compiled model, run once on its shape before the first point
  (the compile time is paid there and a failure is one line); ``auto`` falls back to eager instead.
* :func:`check_compiler`: compiles a one-line function on the device, so that a missing C compiler
  (CPU) or Triton (GPU) stops ``fit`` before any logger starts.

Compiled logits differ from eager ones by float rounding only: a row can change only where that flips
the top class of a noisy sample (tests/test_compiling.py counts them). Training compiles through
:class:`CompiledModel` too (``--model.compile``), kept outside the LightningModule's children, so
checkpoints hold the model's own keys (no ``_orig_mod.`` prefix).
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Literal, Optional

import torch
from torch import nn

from lightning_idrs.arguments import UsageError, one_line

__all__ = ["COMPILE_MODES", "CompileError", "CompileMode", "CompileOption", "CompiledModel", "check_compiler",
           "compile_for_certification", "quiet_autotuning", "resolve_mode", "torch_options"]

COMPILE_MODES = ("none", "default", "max-autotune")
CompileMode = Literal["none", "default", "max-autotune"]
CompileOption = Literal["auto", "none", "default", "max-autotune"]
#: Our names -> torch.compile's modes.
TORCH_MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs"}


class CompileError(UsageError):
    """torch.compile could not compile the model (no C compiler, no Triton, an unsupported model)."""


def resolve_mode(option: str, device) -> str:
    """The mode ``option`` means on ``device``: ``auto`` is ``max-autotune`` on CUDA, else ``none``."""
    if option not in ("auto", *COMPILE_MODES):
        raise ValueError(f"compile must be one of auto, {', '.join(COMPILE_MODES)}, got {option!r}")
    if option == "auto":
        return "max-autotune" if torch.device(device).type == "cuda" else "none"
    return option


def torch_options(mode: str) -> dict:
    """The keyword arguments of torch.compile for ``mode`` (tests swap the backend here)."""
    return {"mode": TORCH_MODES[mode]}


@contextmanager
def quiet_autotuning():
    """Keep max-autotune's reports off the output while a model compiles: inductor writes a table of timings
    for every kernel it tunes, and logs with a traceback every candidate kernel that fails to build (e.g. a
    Triton configuration needing more shared memory than the GPU has), although it only drops that candidate
    (seen on an H200: hundreds of lines before certify's first point). Real compiler failures still raise."""
    from torch._inductor import config

    quiet = {key: value for key, value in (("autotune_num_choices_displayed", 0),
                                           ("max_autotune_report_choices_stats", False)) if hasattr(config, key)}
    logger = logging.getLogger("torch._inductor.select_algorithm")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with config.patch(quiet):
            yield
    finally:
        logger.setLevel(level)


def _reason(error: BaseException) -> str:
    """The line of a compiler error that says what went wrong (not dynamo's advice on verbose logs)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("backend=", "Set TORCHDYNAMO_VERBOSE", "You can suppress",
                                                              "import torch._dynamo", "torch._dynamo.config"))]
    return one_line((useful or lines or [type(error).__name__])[0])[:300]


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _memory_error(batch_size: Optional[int], fix: str) -> UsageError:
    return UsageError(f"the GPU ran out of memory at {batch_size or 'this'} samples per forward pass; pass a smaller "
                      f"batch size ({fix})")


class CompiledModel(nn.Module):
    """``model`` under torch.compile in ``mode``; with ``batch_size`` (static shapes), every call runs exactly
    ``batch_size`` rows: shorter inputs are padded with zeros, longer ones split, and only the input's own
    rows of the logits are returned. ``fix`` is the option that turns compiling off (for error lines)."""

    def __init__(self, model: nn.Module, mode: str, fix: str, batch_size: Optional[int] = None):
        super().__init__()
        if mode not in TORCH_MODES:
            raise ValueError(f"mode must be one of {', '.join(TORCH_MODES)}, got {mode!r}")
        self.mode, self.fix, self.batch_size = mode, fix, batch_size
        self._compiled_once = False  # the first call compiles (quietly, see quiet_autotuning)
        self.compiled = torch.compile(model, dynamic=False if batch_size else None, **torch_options(mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.batch_size is None or rows == self.batch_size:
            return self._run(x)
        if rows > self.batch_size:
            return torch.cat([self(part) for part in x.split(self.batch_size)])
        padding = x.new_zeros((self.batch_size - rows, *x.shape[1:]))
        return self._run(torch.cat([x, padding]))[:rows]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        try:
            with nullcontext() if self._compiled_once else quiet_autotuning():
                logits = self.compiled(x)
            self._compiled_once = True
            return logits
        except Exception as error:
            from torch._dynamo.exc import TorchDynamoException

            if _out_of_memory(error):
                raise _memory_error(self.batch_size, f"or {self.fix}") from None
            if isinstance(error, TorchDynamoException):
                raise CompileError(f"torch.compile (mode {TORCH_MODES[self.mode]}) cannot compile the model: "
                                   f"{_reason(error)}; run it uncompiled with {self.fix}") from None
            raise


def compile_for_certification(model: nn.Module, option: str, batch_size: int, input_shape, device,
                              forward_context=nullcontext, verbose: bool = False,
                              fix: str = "--certify.compile none") -> tuple[nn.Module, str]:
    """(the base classifier to certify with, the mode it runs in).

    ``option`` ``none`` (and ``auto`` off CUDA) returns ``model`` itself. Otherwise the model is compiled
    for ``batch_size`` rows and run once on zeros under ``forward_context`` and inference mode, as
    certification runs it, so the first point reuses this compilation; ``verbose`` prints what it does
    and the time it took. A failure raises :class:`CompileError`, except under ``auto``, which warns and
    certifies eagerly.
    """
    mode = resolve_mode(option, device)
    if mode == "none":
        return model, "none"
    if verbose:
        print(f"compiling the base classifier (torch.compile {TORCH_MODES[mode]}, {batch_size:,} samples per forward "
              "pass): a minute or more the first time, seconds once torch's cache holds it", flush=True)
    start, was_training = time.perf_counter(), model.training
    try:
        compiled = CompiledModel(model, mode, fix, batch_size).eval()
        with torch.inference_mode(), forward_context():
            compiled(torch.zeros(batch_size, *input_shape, device=device))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # the compiled model failing on its first call: a compiler problem
        if _out_of_memory(error) and not isinstance(error, UsageError):
            error = _memory_error(batch_size, f"or {fix}")
        if not isinstance(error, UsageError):
            error = CompileError(f"torch.compile (mode {TORCH_MODES[mode]}) cannot run the model: {_reason(error)}; "
                                 f"run it uncompiled with {fix}")
        if option != "auto" or not isinstance(error, CompileError):
            raise error from None
        if verbose:
            print(f"warning: {one_line(error)}; certifying uncompiled (eager) instead", file=sys.stderr, flush=True)
        return model, "none"
    finally:
        model.train(was_training)
    if verbose:
        print(f"compiled in {time.perf_counter() - start:.1f} s", flush=True)
    return compiled, mode


def check_compiler(device, mode: str, fix: str) -> None:
    """Compile and run a one-line function on ``device`` in ``mode``: CompileError when the toolchain
    torch.compile needs (a C++ compiler on CPU, Triton on a GPU) is missing or broken."""
    if mode == "none":
        return
    probe = CompiledModel(_Probe(), mode, fix)
    with torch.no_grad():
        probe(torch.ones(8, device=device))


class _Probe(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2.0 + 1.0
