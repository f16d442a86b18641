"""The kNN search behind KnnSigma: faiss (an extra, [cpu] or [gpu]) or torch (``knn_backend``), the same
exact distances from both, and what a user sees when faiss is missing or broken (one ``error:`` line from
fit, certify and doctor; doctor goes on with its other checks)."""
import importlib.abc
import logging
import sys

import numpy as np
import pytest
import torch

from lightning_idrs import KnnSigma, knn, knn_search
from lightning_idrs.arguments import UsageError
from lightning_idrs.commands import doctor, main
from lightning_idrs.knn import KnnIndex, choose, faiss_has_gpu, ieee_float32_matmul
from lightning_idrs.tsv_log import TSV_NAME, read_tsv
from tests.helpers import QUIET, ROWS, SMALL

BAD_CAST = "C++ exception std::bad_cast"  # what pip's faiss-cuda 1.14.1 raises from index_factory(d, "Flat")
FIT = ["fit", "--trainer.max_epochs", "1", "--trainer.logger", "false", *QUIET]


def brute_force(queries, train, k):
    """(mean, k-th) float64 distances to the k nearest of KnnIndex's fixed set {mu + fl32(p_i - mu)};
    ``queries`` None: from each point of that set, itself excluded (the training sigmas)."""
    train = np.asarray(train, np.float32).reshape(len(train), -1)
    mu = train.astype(np.float64).mean(0)
    centred = (train.astype(np.float64) - mu).astype(np.float32).astype(np.float64)
    if queries is None:
        dist = np.sqrt(((centred[:, None] - centred[None]) ** 2).sum(-1))
        dist[np.arange(len(dist)), np.arange(len(dist))] = np.inf
    else:
        queries = np.asarray(queries, np.float64).reshape(len(queries), 1, -1) - mu
        dist = np.sqrt(((queries - centred[None]) ** 2).sum(-1))
    nearest = np.sort(dist, 1)[:, :k]
    return nearest.mean(1), nearest[:, -1]


def near_ties_and_duplicates(d=24, seed=0):
    """Training points where the float32 search cannot decide: 60 points on one sphere around each of 10
    centres (radii equal to 1e-7), 5 points repeated 30 times (ties beyond the candidate margin); queries
    at the centres, at the duplicated points and elsewhere."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(300, d))
    centres = rng.normal(size=(10, d)) * 3
    sphere = rng.normal(size=(600, d))
    sphere *= 2.0 * (1 + rng.normal(scale=1e-7, size=(600, 1))) / np.linalg.norm(sphere, axis=1, keepdims=True)
    train = np.concatenate([base, np.repeat(base[:5], 30, axis=0), np.repeat(centres, 60, axis=0) + sphere])
    queries = np.concatenate([centres, base[:5], base[5:25] + 1e-6, rng.normal(size=(40, d))])
    return torch.from_numpy(train.astype(np.float32)), torch.from_numpy(queries.astype(np.float32))


@pytest.fixture
def no_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError, as when it is not installed


class _BrokenWheel(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "faiss":
            raise ImportError("libcudart.so.13: cannot open shared object file: No such file or directory")


@pytest.fixture
def broken_faiss_import(monkeypatch):
    """`import faiss` raises as a wheel built against missing CUDA libraries does."""
    for name in [name for name in sys.modules if name == "faiss" or name.startswith("faiss.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenWheel(), *sys.meta_path])


@pytest.fixture
def failing_faiss_search(monkeypatch):
    """faiss imports and builds its index, and every search raises (as a broken faiss-cuda does)."""
    import faiss

    def search(self, *args, **kwargs):
        raise RuntimeError(BAD_CAST)

    monkeypatch.setattr(faiss.IndexFlatL2, "search", search)


def spy(monkeypatch, cls, name):
    """Count the calls of ``cls.name`` (still called)."""
    calls = []
    original = getattr(cls, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


# ------------------------------------------------------------------------------------ faiss without index_factory
def test_the_exact_index_is_built_and_searched_without_index_factory(monkeypatch):
    import faiss

    def index_factory(*args, **kwargs):
        raise RuntimeError(BAD_CAST)

    monkeypatch.setattr(faiss, "index_factory", index_factory)
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.normal(size=(400, 12)).astype(np.float32))
    queries = torch.from_numpy(rng.normal(size=(30, 12)).astype(np.float32))
    sigma = KnnSigma(0.5, 0.3, k=7, knn_backend="faiss").fit(train)
    mean, _ = brute_force(queries, train, 7)
    np.testing.assert_allclose(sigma.neighbour_distance(queries).numpy(), mean, rtol=1e-12)
    training, _ = brute_force(None, train, 7)
    np.testing.assert_allclose(sigma._train_dist.numpy(), training, rtol=1e-12)
    assert isinstance(sigma._index._faiss, faiss.IndexFlatL2)
    # an approximate factory string still goes through index_factory: its failure is one line naming the build
    with pytest.raises(UsageError) as raised:
        KnnIndex(train.numpy(), "IVF4,Flat")
    message = str(raised.value)
    assert message.startswith(f"faiss failed building the CPU index 'IVF4,Flat': RuntimeError: {BAD_CAST} (faiss-cpu ")
    assert f"faiss {faiss.__version__}, CPU build); fix: reinstall the kNN backend" in message
    assert "--model.sigma.knn_backend torch" in message and "--certify.knn_backend torch" in message


def test_without_faiss_the_index_asks_for_the_extra(no_faiss):
    with pytest.raises(UsageError, match=r"faiss is not installed .*pip install 'lightning_idrs\[cpu\]', or "
                                         r"'lightning_idrs\[gpu\]' on a CUDA 13 GPU machine; or search without faiss: "
                                         r"knn_backend torch"):
        KnnIndex(np.zeros((10, 3), np.float32))


def test_a_broken_faiss_import_is_one_usage_error_naming_the_build(broken_faiss_import):
    with pytest.raises(UsageError) as raised:
        knn.import_faiss()
    message = str(raised.value)
    assert message.startswith("faiss failed to import: ImportError: libcudart.so.13: cannot open shared object file")
    assert "(faiss-cpu " in message and "CPU build); fix: reinstall the kNN backend" in message


def test_the_torch_backend_needs_no_faiss(no_faiss):
    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.normal(size=(300, 2, 5)).astype(np.float32))
    queries = torch.from_numpy(rng.normal(size=(20, 2, 5)).astype(np.float32))
    sigma = KnnSigma(0.5, 0.3, k=5, knn_backend="torch").fit(train)
    mean, _ = brute_force(queries, train, 5)
    np.testing.assert_allclose(sigma.neighbour_distance(queries).numpy(), mean, rtol=1e-12)
    with pytest.raises(UsageError, match="^faiss is not installed"):
        sigma.knn_backend = "auto"
        sigma(queries)


# ------------------------------------------------------------------------------------ torch == faiss, exactly
@pytest.mark.parametrize("statistic", ["mean", "kth"])
def test_torch_and_faiss_give_bit_identical_sigma_with_near_ties_and_duplicates(statistic, monkeypatch):
    train, queries = near_ties_and_duplicates()
    scans = spy(monkeypatch, KnnIndex, "_scan")
    every = spy(monkeypatch, KnnIndex, "_candidate_dist")
    faiss_sigma = KnnSigma(0.5, 1.0, k=8, statistic=statistic, knn_backend="faiss").fit(train)
    torch_sigma = KnnSigma(0.5, 1.0, k=8, statistic=statistic, knn_backend="torch").fit(train)
    assert faiss_sigma.m == torch_sigma.m
    assert torch.equal(faiss_sigma._train_dist, torch_sigma._train_dist)
    assert torch.equal(faiss_sigma.neighbour_distance(queries), torch_sigma.neighbour_distance(queries))
    assert torch.equal(faiss_sigma(queries), torch_sigma(queries))
    assert torch.equal(faiss_sigma.training_sigma(None, torch.arange(len(train))),
                       torch_sigma.training_sigma(None, torch.arange(len(train))))
    # both ran the fallbacks: the float64 scan, and for the duplicates every distance of a row
    assert len(scans) >= 4 and any(args[3].shape[1] == len(train) for args in every)
    mean, kth = brute_force(queries, train, 8)
    np.testing.assert_allclose(torch_sigma.neighbour_distance(queries).numpy(), mean if statistic == "mean" else kth,
                               rtol=1e-12)
    training = brute_force(None, train, 8)[statistic == "kth"]
    np.testing.assert_allclose(torch_sigma._train_dist.numpy(), training, rtol=1e-12)


def test_the_torch_search_is_blocked_and_its_distances_within_the_float32_bound(monkeypatch):
    rng = np.random.default_rng(3)
    points = (rng.normal(size=(3000, 40)) + 5).astype(np.float32)
    index = KnnIndex(points, backend="torch")
    monkeypatch.setitem(knn_search.BLOCK, "cpu", 2 ** 12)  # 64 queries: blocks of 64 points, 47 of them merged
    search = index._search(torch.device("cpu"), "torch", 20)
    q = torch.from_numpy(rng.normal(size=(64, 40)) + 5) - index.mu
    dist2, ids = search(q, 20)
    exact = ((index.xb.double()[None] - q[:, None]) ** 2).sum(-1)
    expected = exact.topk(20, dim=1, largest=False).indices
    assert (ids.sort(1).values == expected.sort(1).values).float().mean() > 0.99  # the 20 nearest, bar near-ties
    error = (dist2.double() - exact.gather(1, ids)).abs()
    assert (error <= search.slack * ((q * q).sum(1, keepdim=True) + index.max_sq_norm)).all()


def _precision_state():
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # legacy and per-backend settings disagree
        legacy = "mixed"
    return legacy, torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision


@pytest.mark.parametrize("setting", ["default", "high", "medium", "cuda tf32", "mkldnn bf16"])
def test_ieee_float32_matmul_switches_tf32_and_bf16_off_and_restores_every_setting(setting):
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has the legacy setting only")
    try:
        if setting in ("high", "medium"):  # the legacy switch (Lightning's hint), which sets both backends
            torch.set_float32_matmul_precision(setting)
        elif setting == "cuda tf32":
            matmul.fp32_precision = "tf32"
        elif setting == "mkldnn bf16":
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        before = _precision_state()
        with ieee_float32_matmul():
            # what a CUDA float32 matmul asks: it raises where the legacy and the per-backend settings disagree
            assert torch._C._get_cublas_allow_tf32() is False
            assert _precision_state() == ("highest", "ieee", "ieee")
        assert _precision_state() == before
    finally:
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = torch.backends.mkldnn.matmul.fp32_precision = "none"


# ------------------------------------------------------------------------------------ which search, the option
@pytest.mark.parametrize("backend, device, faiss_gpu, exact, expected", [
    ("auto", "cuda", True, True, "faiss-gpu"), ("auto", "cuda", False, True, "torch"), ("auto", "cpu", False, True, "faiss"),
    ("faiss", "cuda", True, True, "faiss-gpu"), ("faiss", "cuda", False, True, "faiss"), ("faiss", "cpu", True, True, "faiss"),
    ("torch", "cuda", True, True, "torch"), ("torch", "cpu", False, True, "torch"),
    ("auto", "cuda", False, False, "faiss"), ("auto", "cuda", True, False, "faiss-gpu"),
])
def test_which_search_runs(backend, device, faiss_gpu, exact, expected):
    assert choose(backend, device, faiss_gpu, exact) == expected


@pytest.mark.skipif(faiss_has_gpu(), reason="faiss' GPU build is installed and sees a GPU")
def test_a_cuda_query_with_cpu_faiss_searches_on_the_cpu_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(knn, "_said", set())
    index = KnnIndex(np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32))
    with caplog.at_level(logging.INFO, logger="lightning_idrs.knn"):
        for _ in range(3):  # knn_backend faiss: the CPU index (no CUDA is touched)
            assert index._search(torch.device("cuda", 0), "faiss", 10).device == torch.device("cpu")
        assert index._gpu_search(torch.device("cuda", 0), required=False) is None  # auto: the torch backend
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_idrs.knn"]
    assert lines == ["kNN search runs on the CPU: the installed faiss is a CPU build (for the GPU index: pip uninstall -y "
                     "faiss-cpu && pip install 'lightning_idrs[gpu]'; or search on the GPU with knn_backend torch)",
                     "kNN search on cuda:0 uses the torch backend: faiss has no GPU index here (faiss-cpu "
                     f"{knn.faiss_build().split('faiss-cpu ')[1]})"]


def test_knn_backend_is_checked_in_python_and_on_the_command_line(checkpoint, tmp_path, capsys):
    with pytest.raises(ValueError, match="^knn_backend must be one of auto, faiss, torch, got 'gpu'$"):
        KnnSigma(knn_backend="gpu")
    with pytest.raises(ValueError, match="^knn_backend 'torch' searches exactly; index_factory 'IVF4,Flat'"):
        KnnSigma(index_factory="IVF4,Flat", knn_backend="torch")
    sigma = KnnSigma()
    with pytest.raises(ValueError, match="got 'cuda'"):
        sigma.knn_backend = "cuda"
    assert sigma.knn_backend == "auto" and "knn_backend=auto" in repr(sigma)
    assert main([*FIT, "--trainer.default_root_dir", str(tmp_path), "--model.sigma.knn_backend", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --model.sigma.knn_backend must be one of auto, faiss, torch, got gpu", err
    assert main(["certify", "--ckpt_path", "x.ckpt", "--certify.knn_backend", "gpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: --certify.knn_backend must be one of auto, faiss, torch, got gpu"
    import lightning_idrs

    with pytest.raises(UsageError, match=f"^cannot use knn_backend='gpu' with the sigma of {checkpoint}: knn_backend "
                                         "must be one of auto, faiss, torch, got 'gpu'$"):
        lightning_idrs.certify(str(checkpoint), tmp_path / "o", knn_backend="gpu")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ one error line per command
def test_fit_without_faiss_is_one_error_line_and_writes_nothing(no_faiss, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    code = main([*FIT, "--trainer.default_root_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: faiss is not installed (") and "lightning_idrs[cpu]" in err[-1]
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("fault", ["broken_faiss_import", "failing_faiss_search"])
def test_fit_with_a_broken_faiss_is_one_error_line_and_writes_nothing(fault, request, tmp_path, capsys):
    request.getfixturevalue(fault)
    out = tmp_path / "run"
    out.mkdir()
    assert main([*FIT, "--trainer.default_root_dir", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    doing = "to import: ImportError: libcudart" if fault == "broken_faiss_import" else \
        f"searching the CPU index: RuntimeError: {BAD_CAST}"
    assert lines[-1].startswith(f"error: faiss failed {doing}") and "fix: reinstall the kNN backend" in lines[-1], err
    assert "Traceback" not in err and err.count("error:") == 1
    assert list(out.iterdir()) == []


def test_certify_with_a_failing_faiss_is_one_line_then_runs_with_knn_backend_torch(failing_faiss_search, checkpoint,
                                                                                 tmp_path, capsys, monkeypatch):
    out, straight = tmp_path / "run", tmp_path / "straight"
    flags = ["--ckpt_path", str(checkpoint), *SMALL, "--certify.max", "4"]
    assert main(["certify", *flags, "--certify.out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: faiss failed searching the CPU index: RuntimeError: "
                                                   f"{BAD_CAST} (faiss-cpu "), err
    assert "Traceback" not in err and err.count("error:") == 1 and not out.exists()
    assert main(["certify", *flags, "--certify.out", str(out), "--certify.knn_backend", "torch"]) == 0
    monkeypatch.undo()  # faiss searches again: the same folder resumes with faiss (the backend is not a setting)
    assert main(["certify", *flags[:-1], "6", "--certify.out", str(out)]) == 0
    assert main(["certify", *flags[:-1], "6", "--certify.out", str(straight)]) == 0
    rows, expected = read_tsv(out / TSV_NAME), read_tsv(straight / TSV_NAME)
    assert rows["idx"].tolist() == list(range(6))
    assert all(np.array_equal(rows[name], expected[name]) for name in ROWS)  # bit-identical sigma on the CPU


def test_a_checkpoint_written_before_knn_backend_loads_and_certifies_the_same(checkpoint, tmp_path, capsys):
    from lightning_idrs.digests import state_dict_sha256
    from lightning_idrs.module import CHECKPOINT_KEY

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["sigma"]["init_args"]["knn_backend"] == "auto"
    for record in (state["hyper_parameters"]["sigma"], state[CHECKPOINT_KEY]["sigma"]):  # (may be one dict)
        record["init_args"].pop("knn_backend", None)
    assert "knn_backend" not in state[CHECKPOINT_KEY]["sigma"]["init_args"]
    assert state[CHECKPOINT_KEY]["weights_sha256"] == state_dict_sha256(state["state_dict"])  # not in the state
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    for path, folder in ((old, "old"), (checkpoint, "new")):
        assert main(["certify", "--ckpt_path", str(path), *SMALL, "--certify.max", "3",
                     "--certify.out", str(tmp_path / folder)]) == 0
    old_rows, new_rows = read_tsv(tmp_path / "old" / TSV_NAME), read_tsv(tmp_path / "new" / TSV_NAME)
    assert all(np.array_equal(old_rows[name], new_rows[name]) for name in ROWS)


@pytest.mark.slow
def test_without_faiss_fit_and_certify_run_with_the_torch_backend_and_certify_as_faiss_does(no_faiss, tmp_path, capsys,
                                                                                          monkeypatch):
    root = tmp_path / "fit"
    assert main([*FIT, "--trainer.default_root_dir", str(root), "--model.sigma.knn_backend", "torch"]) == 0
    ckpt = next(root.rglob("best-*.ckpt"))
    flags = ["--ckpt_path", str(ckpt), *SMALL, "--certify.max", "4"]
    capsys.readouterr()
    assert main(["certify", *flags, "--certify.out", str(tmp_path / "auto")]) == 0  # the checkpoint says torch
    assert main(["certify", *flags, "--certify.out", str(tmp_path / "x"), "--certify.knn_backend", "auto"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: faiss is not installed (")
    assert not (tmp_path / "x").exists()
    monkeypatch.undo()  # faiss is back: the same checkpoint certified with faiss gives the same rows
    assert main(["certify", *flags, "--certify.out", str(tmp_path / "faiss"), "--certify.knn_backend", "faiss"]) == 0
    rows, expected = read_tsv(tmp_path / "auto" / TSV_NAME), read_tsv(tmp_path / "faiss" / TSV_NAME)
    assert len(rows["idx"]) == 4 and all(np.array_equal(rows[name], expected[name]) for name in ROWS)


# ------------------------------------------------------------------------------------ doctor
def doctor_lines(capsys):
    code = doctor.run([])
    out = capsys.readouterr().out.splitlines()
    return code, {line[5:].split(":")[0]: line for line in out if line[:5].strip() in ("ok", "FAIL", "skip")}, out


def test_doctor_with_a_failing_faiss_search_fails_that_check_and_goes_on(failing_faiss_search, capsys):
    code, lines, out = doctor_lines(capsys)
    assert code == 1 and out[-1] == "doctor: 1 check(s) failed: knn faiss cpu", out
    assert lines["knn faiss cpu"].startswith(f"FAIL knn faiss cpu: faiss failed searching the CPU index: RuntimeError: "
                                             f"{BAD_CAST} (faiss-cpu ")
    assert lines["faiss"].startswith("ok   faiss") and lines["knn torch cpu"].startswith("ok   knn torch cpu")
    assert lines["certify cpu"].startswith("ok   certify cpu") and "kNN sigma (torch backend)" in "\n".join(out)


def test_doctor_with_a_broken_faiss_import_fails_that_check_and_goes_on(broken_faiss_import, capsys):
    code, lines, out = doctor_lines(capsys)
    assert code == 1 and out[-1] == "doctor: 1 check(s) failed: faiss", out
    assert lines["faiss"].startswith("FAIL faiss: faiss failed to import: ImportError: libcudart.so.13")
    assert "knn faiss cpu" not in lines and "bit-identical" not in lines["knn torch cpu"]
    assert lines["knn torch cpu"].startswith("ok") and lines["certify cpu"].startswith("ok")


def test_doctor_turns_a_check_that_raises_into_a_fail_line(monkeypatch, capsys):
    def crash(report):
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(doctor, "check_devices", crash)
    monkeypatch.setattr(doctor, "check_certify", lambda report, *args: report.check("certify cpu", True, "skipped"))
    code, lines, out = doctor_lines(capsys)
    assert code == 1 and out[-1] == "doctor: 1 check(s) failed: gpu", out
    assert lines["gpu"].startswith("FAIL gpu: RuntimeError: CUDA error: unspecified launch failure (raised by the check")
    assert lines["knn faiss cpu"].startswith("ok") and lines["knn torch cpu"].startswith("ok")


# ------------------------------------------------------------------------------------ on a GPU (pytest -m gpu)
def _cuda_tolerance(index, reference, k):
    return doctor.float64_tolerance(index, reference.numpy(), k)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_on_cuda_the_backends_give_the_cpu_sigma(backend):
    """Equal to the CPU up to float64 rounding: both devices re-rank with the same float64 formula but CUDA
    sums in another order, so a distance may move by the float64 forward-error bound (docs/math.md, "Floating
    point"), never more; sigma, rounded to float32, then differs by at most one float32 step."""
    if backend == "faiss" and not faiss_has_gpu():
        pytest.skip("no GPU build of faiss that sees a GPU is installed")
    train, queries = near_ties_and_duplicates(d=48)
    cpu = KnnSigma(0.5, 1.0, k=8, knn_backend="faiss").fit(train)
    gpu = KnnSigma(0.5, 1.0, k=8, knn_backend=backend).to("cuda").fit(train)
    assert abs(gpu.m - cpu.m) <= 1e-12 * abs(cpu.m)
    gpu.m = cpu.m  # compare sigma(x) of the same function
    for got, expected in ((gpu.neighbour_distance(queries.cuda()), cpu.neighbour_distance(queries)),
                          (gpu._train_dist, cpu._train_dist)):
        assert got.device.type == "cuda"
        assert ((got.cpu() - expected).abs().numpy() <= _cuda_tolerance(cpu._index, expected, 8)).all()
    sigma_gpu, sigma_cpu = gpu(queries.cuda()).cpu(), cpu(queries)
    assert (torch.abs(sigma_gpu - sigma_cpu) <= torch.finfo(torch.float32).eps * sigma_cpu).all()
    if backend == "torch" and faiss_has_gpu():  # the two GPU searches: the same k smallest float64 distances
        other = KnnSigma(0.5, 1.0, k=8, m=cpu.m, knn_backend="faiss").to("cuda").fit(train)
        got, expected = gpu.neighbour_distance(queries.cuda()).cpu(), other.neighbour_distance(queries.cuda()).cpu()
        assert ((got - expected).abs().numpy() <= _cuda_tolerance(cpu._index, expected, 8)).all()


@pytest.mark.gpu
def test_on_cuda_the_torch_search_stays_in_float32_with_tf32_switched_on():
    """TF32 would break the float32 rounding bound on these inputs; the search switches it off."""
    rng = np.random.default_rng(4)
    points = (rng.normal(size=(4000, 512)) + 20).astype(np.float32)
    index = KnnIndex(points, backend="torch", device="cuda")
    q = (torch.from_numpy(rng.normal(size=(256, 512)) + 20) - index.mu).cuda()
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 everywhere else
    try:
        search = index._search(torch.device("cuda"), "torch", 30)
        dist2, ids = search(q, 30)
    finally:
        torch.set_float32_matmul_precision(saved)
    xb = index._points("cuda").double()
    exact = ((xb[ids] - q[:, None]) ** 2).sum(-1)
    slack = search.slack * ((q * q).sum(1, keepdim=True) + index.max_sq_norm)
    assert ((dist2.double() - exact).abs() <= slack).all()
