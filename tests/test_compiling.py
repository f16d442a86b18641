"""The base classifier under torch.compile (``--certify.compile``, the Callback's ``compile``, ``--model.compile``):
one static batch shape with the padding ignored, the mode recorded with the rows, compiler failures as one
line, and training through a compiled model whose checkpoints keep their keys.

Fast tests swap torch.compile's backend for dynamo's counting one (the graph runs eagerly: the rows must
be identical to eager ones); the slow tests compile with inductor on this CPU (a C++ compiler is needed)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import lightning_idrs
from lightning_idrs import compiling
from lightning_idrs.commands.certify import main
from lightning_idrs.compiling import CompiledModel, compile_for_certification
from lightning_idrs.smoothing import PointNoise, SmoothedClassifier
from lightning_idrs.tsv_log import SETTINGS_NAME, TSV_NAME
from tests.helpers import ROWS, SMALL, differing_rows

QUIET = dict(n0=10, n=200, wandb=lightning_idrs.certification.WandbOptions(mode="disabled"))


@pytest.fixture
def counted(monkeypatch):
    """torch.compile with dynamo's CompileCounter backend (graphs run eagerly); dynamo's caches reset around."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(compiling, "torch_options", lambda mode: {"backend": counter})
    yield counter
    torch._dynamo.reset()


@pytest.fixture
def broken_compiler(monkeypatch):
    """A backend that fails as inductor does without a C++ compiler."""
    def backend(graph, example_inputs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")

    torch._dynamo.reset()
    monkeypatch.setattr(compiling, "torch_options", lambda mode: {"backend": backend})
    yield
    torch._dynamo.reset()


class Direction(nn.Module):
    """Logits of x / |x|: NaN for an all-zero row, such as the padding."""

    def forward(self, x):
        flat = x.flatten(1)
        return (flat / flat.norm(dim=1, keepdim=True))[:, :3]


def test_every_call_gets_the_static_batch_and_the_padding_is_dropped():
    seen = []

    class Recording(Direction):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return super().forward(x)

    model = CompiledModel(Direction(), "default", "--certify.compile none", batch_size=8)
    model.compiled = Recording()  # the padding logic alone
    x = torch.rand(19, 2, 3)
    out = model(x)
    assert seen == [(8, 2, 3)] * 3 and out.shape == (19, 3)
    assert torch.equal(out, Direction()(x)) and torch.isfinite(out).all(), "the padding's NaN rows are dropped"


def test_certifying_through_the_static_batch_compiles_once_and_changes_no_row(counted):
    smoothed = {name: SmoothedClassifier(model, lightning_idrs.ConstantSigma(0.5), num_classes=3)
                for name, model in (("eager", Direction()),
                                    ("compiled", CompiledModel(Direction(), "default", "-", batch_size=64)))}
    x = torch.rand(5, 2, 3) + 0.5
    with torch._dynamo.config.patch(error_on_recompile=True):  # 5 x 10 and 5 x 300 samples: ragged last batches
        rows = {name: s.certify(x, 10, 300, 0.01, batch_size=64, generator=PointNoise(0, range(5)))
                for name, s in smoothed.items()}
    assert counted.frame_count == 1, "one shape, compiled once"
    for field in ("prediction", "p_a_lower", "radius"):  # NaN padding was neither counted nor refused
        np.testing.assert_array_equal(getattr(rows["eager"], field), getattr(rows["compiled"], field))


def test_a_compiled_certification_records_its_mode_and_its_rows_are_the_eager_ones(checkpoint, tmp_path, counted):
    options = dict(QUIET, max=6, points_per_chunk=4, precision="bf16-mixed")
    eager = lightning_idrs.certify(checkpoint, tmp_path / "eager", compile="none", **options)
    with torch._dynamo.config.patch(error_on_recompile=True):  # compiled before the first point, under autocast
        compiled = lightning_idrs.certify(checkpoint, tmp_path / "compiled", compile="default", **options)
    assert counted.frame_count == 1
    assert all(np.array_equal(eager.rows[k], compiled.rows[k]) for k in ROWS)
    assert json.loads((tmp_path / "compiled" / SETTINGS_NAME).read_text())["compile"] == "default"
    assert "compile" not in json.loads((tmp_path / "eager" / SETTINGS_NAME).read_text())
    assert compiled.summary["compile"] == "default" and compiled.summary["batch_size"] == 1000  # the CPU default
    with pytest.raises(ValueError, match="compile: 'default' in the directory, absent now"):  # a resume must match
        lightning_idrs.certify(checkpoint, tmp_path / "compiled", **dict(options, max=8, compile="none"))


def test_auto_is_eager_on_cpu_and_max_autotune_on_cuda(checkpoint, tmp_path, counted):
    result = lightning_idrs.certify(checkpoint, tmp_path, max=2, **QUIET)
    assert counted.frame_count == 0 and "compile" not in result.summary
    assert [compiling.resolve_mode("auto", device) for device in ("cpu", "cuda", "cuda:1")] == \
        ["none", "max-autotune", "max-autotune"]
    assert compiling.TORCH_MODES["max-autotune"] == "max-autotune-no-cudagraphs"


def test_a_compiler_failure_is_one_error_line_and_writes_nothing(checkpoint, tmp_path, capsys, broken_compiler):
    out = tmp_path / "out"
    code = main(["--ckpt_path", str(checkpoint), *SMALL, "--certify.out", str(out), "--certify.compile", "default"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: torch.compile (mode default) cannot compile the model: ")
    assert "InvalidCxxCompiler: No working C++ compiler found" in err[0] and err[0].endswith("--certify.compile none")
    assert not (out / TSV_NAME).exists()


def test_auto_falls_back_to_eager_when_compiling_fails(checkpoint, tmp_path, capsys, broken_compiler, monkeypatch):
    monkeypatch.setattr(compiling, "resolve_mode", lambda option, device: option.replace("auto", "default"))  # a GPU
    eager = lightning_idrs.certify(checkpoint, tmp_path / "eager", max=3, compile="none", **QUIET)
    capsys.readouterr()
    fallback = lightning_idrs.certify(checkpoint, tmp_path / "auto", max=3, **QUIET)
    assert "warning: torch.compile (mode default) cannot compile the model" in capsys.readouterr().err
    assert "compile" not in fallback.summary and all(np.array_equal(eager.rows[k], fallback.rows[k]) for k in ROWS)


def test_the_compile_options_refuse_unknown_modes(checkpoint, tmp_path, capsys):
    assert main(["--ckpt_path", str(checkpoint), *SMALL, "--certify.compile", "fast"]) == 2
    assert "--certify.compile must be one of auto, none, default, max-autotune, got fast" in capsys.readouterr().err
    with pytest.raises(ValueError, match="compile must be one of"):
        lightning_idrs.CertificationCallback(compile="fast")
    with pytest.raises(ValueError, match="compile must be one of none, default, max-autotune, got 'auto'"):
        lightning_idrs.IDRSClassifier(compile="auto")


def test_compile_for_certification_passes_a_memory_error_on(monkeypatch):
    def out_of_memory(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(CompiledModel, "forward", out_of_memory)
    for option in ("default", "auto"):
        monkeypatch.setattr(compiling, "resolve_mode", lambda option, device: "default")
        with pytest.raises(compiling.UsageError, match="ran out of memory at 64 samples per forward pass"):
            compile_for_certification(Direction(), option, 64, (2, 3), "cpu")


OBJECTIVES = {"GaussianAugmentation": {}, "ConsistencyRegularization": dict(num_noise=2),
              "MACER": dict(num_noise=2)}


@pytest.mark.parametrize("objective, sigma", [
    ("GaussianAugmentation", "KnnSigma"), ("ConsistencyRegularization", "ConstantSigma"), ("MACER", "ConstantSigma")])
def test_training_steps_run_the_compiled_model_in_bf16(objective, sigma, counted):
    from lightning_idrs.data import DigitsDataModule

    sigmas = {"KnnSigma": lambda: lightning_idrs.KnnSigma(0.25, 0.1, 5),
              "ConstantSigma": lambda: lightning_idrs.ConstantSigma(0.25)}
    module = lightning_idrs.IDRSClassifier(arch="mlp", sigma=sigmas[sigma](), compile="default",
                                           objective=getattr(lightning_idrs, objective)(**OBJECTIVES[objective]))
    data = DigitsDataModule(batch_size=64)
    module.attach_data(data)
    optimizer, batches = torch.optim.Adam(module.parameters(), lr=2e-3), iter(data.train_dataloader())
    for step in range(3):  # a few steps: in bf16, MACER's Phi^-1 of a probability rounded to 1 once gave NaN here
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what --trainer.precision bf16-mixed does around a step
            loss = module.training_step(next(batches), step)
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in module.model.parameters()), step
        optimizer.step()
    assert counted.frame_count >= 1 and isinstance(module.network, CompiledModel)
    keys = list(module.state_dict())
    assert keys and not any("_orig_mod" in key or "_compiled" in key for key in keys)
    assert "_compiled" in module.__dict__ and "_compiled" not in module.__getstate__()  # compiled code does not pickle


@pytest.mark.slow
def test_inductor_rows_equal_the_eager_ones_but_for_counted_float_flips(checkpoint, tmp_path, record_property):
    torch._dynamo.reset()
    options = dict(QUIET, n=500, max=30, points_per_chunk=10)
    eager = lightning_idrs.certify(checkpoint, tmp_path / "eager", compile="none", **options)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one shape: the selection's 100 rows are padded
        compiled = lightning_idrs.certify(checkpoint, tmp_path / "compiled", compile="default", **options)
    torch._dynamo.reset()
    flips = differing_rows(eager, compiled)
    record_property("rows_differing_from_eager", flips)
    print(f"inductor (default mode) vs eager on CPU: {flips} of 30 rows differ")
    assert flips <= 3 and compiled.summary["compile"] == "default"


@pytest.mark.slow
def test_without_a_cpp_compiler_compiling_is_one_error_line(checkpoint, tmp_path):
    import subprocess
    import sys

    from tests.helpers import env

    variables = env(CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    for command, fix in ((["certify", "--ckpt_path", str(checkpoint), *SMALL, "--certify.compile", "default",
                           "--certify.out", str(tmp_path / "out")], "--certify.compile none"),
                         (["fit", "--model.compile", "default", "--trainer.max_epochs", "1",
                           "--trainer.logger", "false",
                           "--trainer.default_root_dir", str(tmp_path / "fit")], "--model.compile none")):
        done = subprocess.run([sys.executable, "-m", "lightning_idrs", *command], env=variables, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and lines[-1].startswith("error: torch.compile"), done.stderr[-2000:]
        assert "C++ compiler" in lines[-1] and lines[-1].endswith(fix) and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / TSV_NAME).exists() and not list((tmp_path / "fit").rglob("*.ckpt"))


@pytest.mark.slow
def test_a_compiled_bf16_fit_writes_a_checkpoint_that_certify_loads(tmp_path):
    from lightning_idrs.commands.fit import cli_main
    from tests.helpers import QUIET as QUIET_FIT

    torch._dynamo.reset()
    cli = cli_main(["fit", "--model.compile", "default", "--trainer.precision", "bf16-mixed",
                    "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "4", "--trainer.logger", "false", "--trainer.default_root_dir",
                    str(tmp_path), *QUIET_FIT])
    torch._dynamo.reset()
    assert isinstance(cli.model.network, CompiledModel)
    path = cli.trainer.checkpoint_callback.best_model_path
    keys = list(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    assert any(key.startswith("model.") for key in keys) and not any("_orig_mod" in key for key in keys)
    result = lightning_idrs.certify(path, tmp_path / "certify", max=3, **QUIET)
    assert result.summary["num_points"] == 3 and "compile" not in result.summary


def test_the_first_compiled_call_keeps_autotuning_reports_quiet_and_restores_them(counted, monkeypatch):
    """max-autotune's timing tables and its logged failing candidates flooded certify's output on an H200:
    the first (compiling) call runs with them off, and inductor's settings are restored afterwards."""
    import logging

    from torch._inductor import config

    seen = []
    before = (config.autotune_num_choices_displayed, config.max_autotune_report_choices_stats,
              logging.getLogger("torch._inductor.select_algorithm").level)

    class Spy(nn.Module):
        def forward(self, x):
            seen.append((config.autotune_num_choices_displayed, config.max_autotune_report_choices_stats,
                         logging.getLogger("torch._inductor.select_algorithm").level))
            return x.flatten(1)[:, :3]

    model = CompiledModel(Spy(), "max-autotune", "--certify.compile none", batch_size=4)
    model(torch.ones(4, 5))  # the compiling call
    model(torch.ones(4, 5))  # already compiled: nothing patched
    assert seen[0] == (0, False, logging.CRITICAL)
    after = (config.autotune_num_choices_displayed, config.max_autotune_report_choices_stats,
             logging.getLogger("torch._inductor.select_algorithm").level)
    assert after == before
