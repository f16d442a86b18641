"""What needs a CUDA GPU (``python -m pytest -m gpu``; skipped without one): compiled certification rows
against eager ones on the GPU, and fits in bf16 with a compiled model (every objective, both sigmas) whose
certification Callback runs on the training GPU. ``scripts/gpu_check.sh`` runs them."""
import numpy as np
import pytest
import torch

import lightning_idrs
from lightning_idrs import callbacks
from lightning_idrs.certification import WandbOptions
from lightning_idrs.compiling import CompiledModel
from lightning_idrs.commands.fit import cli_main
from tests.helpers import QUIET, differing_rows

pytestmark = pytest.mark.gpu
CERTIFY = dict(n0=100, n=2000, max=40, wandb=WandbOptions(mode="disabled"))


def test_compiled_rows_on_the_gpu_equal_the_eager_ones_but_for_counted_flips(checkpoint, tmp_path, record_property):
    eager = lightning_idrs.certify(checkpoint, tmp_path / "eager", accelerator="gpu", compile="none", **CERTIFY)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # one static shape for the whole run
        compiled = lightning_idrs.certify(checkpoint, tmp_path / "compiled", accelerator="gpu", compile="default",
                                          **CERTIFY)  # inductor's default mode: max-autotune (auto) compiles longer
    torch._dynamo.reset()
    assert compiled.summary["compile"] == "default" and compiled.summary["device"] == "cuda"
    assert eager.summary["batch_size"] == 16_000 and eager.summary["points_per_chunk"] == 16  # the GPU defaults
    flips = differing_rows(eager, compiled)
    record_property("rows_differing_from_eager", flips)
    print(f"GPU: compiled (default) vs eager, {flips} of {len(eager.rows['idx'])} rows differ")
    assert flips <= 4


@pytest.mark.parametrize("objective, sigma, arch, callback_compile", [
    ("GaussianAugmentation", "KnnSigma", "small_cnn", "default"),
    ("ConsistencyRegularization", "ConstantSigma", "mlp", "none"),  # the MLP compiles fastest
    ("MACER", "KnnSigma", "mlp", "none"),
])
def test_a_compiled_bf16_fit_certifies_on_the_training_gpu(objective, sigma, arch, callback_compile, tmp_path,
                                                           monkeypatch):
    devices = []

    def recording(smoothed, dataset, chunks, settings, device, *args):
        model_device = next(smoothed.base_classifier.parameters()).device.type  # the model as it trains
        devices.append((torch.device(device).type, model_device, settings.batch_size))
        yield from certify_sharded(smoothed, dataset, chunks, settings, device, *args)

    certify_sharded = callbacks.certify_sharded
    monkeypatch.setattr(callbacks, "certify_sharded", recording)
    torch._dynamo.reset()
    cli = cli_main(["fit", "--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed",
                    "--model.compile", "default", "--model.arch", arch, "--model.objective", objective,
                    "--model.sigma", sigma, "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "6", "--trainer.logger", "false", "--trainer.callbacks=[]",
                    "--trainer.callbacks+=lightning_idrs.callbacks.CertificationCallback",
                    "--trainer.callbacks.num_points=30", "--trainer.callbacks.n=128",
                    f"--trainer.callbacks.compile={callback_compile}",
                    "--trainer.default_root_dir", str(tmp_path), *QUIET])
    torch._dynamo.reset()
    assert devices and all(device == ("cuda", "cuda", 16_000) for device in devices), devices
    metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    assert np.isfinite(metrics["monitor/acr"]) and metrics["monitor/num_points"] == 30
    # (after fit, Lightning's teardown has moved the module back to the CPU: the device is read above, mid-fit)
    assert isinstance(cli.model.network, CompiledModel)
