"""The kNN backend: faiss comes from an extra ([cpu] or [gpu]); what happens when it is missing or CPU-only."""
import logging
import sys

import numpy as np
import pytest
import torch

from lightning_idrs import knn
from lightning_idrs.commands import main
from lightning_idrs.knn import KnnIndex, faiss_has_gpu
from lightning_idrs.arguments import UsageError


@pytest.fixture
def no_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError, as when it is not installed


def test_without_faiss_the_index_asks_for_the_extra(no_faiss):
    with pytest.raises(UsageError, match=r"faiss is not installed .*pip install 'lightning_idrs\[cpu\]', or "
                                         r"'lightning_idrs\[gpu\]' on a CUDA 13 GPU machine"):
        KnnIndex(np.zeros((10, 3), np.float32))


def test_fit_without_faiss_is_one_error_line_and_writes_nothing(no_faiss, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    code = main(["fit", "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar",
                 "false", "--trainer.default_root_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: faiss is not installed (") and "lightning_idrs[cpu]" in err[-1]
    assert list(out.iterdir()) == []


@pytest.mark.skipif(faiss_has_gpu(), reason="faiss' GPU build is installed and sees a GPU")
def test_a_cuda_query_with_cpu_faiss_searches_on_the_cpu_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(knn, "_said_cpu_only", False)
    index = KnnIndex(np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="lightning_idrs.knn"):
        for _ in range(3):
            assert index._on_gpu(torch.device("cuda", 0)) is None
        assert index._on_gpu(torch.device("cpu")) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_idrs.knn"]
    assert lines == ["kNN search runs on the CPU: the installed faiss is a CPU build (for the GPU index: pip "
                     "uninstall -y faiss-cpu && pip install 'lightning_idrs[gpu]')"]
