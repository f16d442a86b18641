"""The predict job: Cohen et al.'s PREDICT with abstention on a data split or on files (``lightning_idrs.predict``).

    import lightning_idrs
    rows = lightning_idrs.predict("best.ckpt", n=10_000, max=100)            # the test split
    rows = lightning_idrs.predict("best.ckpt", inputs=["a.png", "b.npy"])    # files

PREDICT draws ``n`` noisy copies of each input at its sigma(x), counts the top two classes nA, nB and returns
the top class unless the two-sided binomial test of nA ~ Bin(nA + nB, 1/2) does not reject at level
``alpha`` (then it abstains, -1): a returned class is the smoothed classifier's with probability at least
1 - alpha (Cohen et al., 2019, Prop. 1). No radius: that is ``certify``'s. Each input's noise depends only on
the seed and its index (its index in the split, or its position among the inputs), as in ``certify``.

The rows are written as one TSV (atomically, at the end): ``idx, label, predict, correct, sigma`` for a split,
``file, index, predict, sigma`` for files (``index``: the image's position inside its file).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from lightning_idrs.arguments import OpenUnitInterval, PositiveInt, Seed, UsageError, check, one_line

__all__ = ["IMAGE_SUFFIXES", "PredictOptions", "predict", "read_inputs"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_POINTS_PER_CALL = 10


@dataclass
class PredictOptions:
    """PREDICT's options (flags --predict.*).

    Args:
        split: the data split predicted when no input files are given.
        n: noise samples per input (Cohen et al.: 100,000).
        alpha: the test's level: a class is returned only when it is the smoothed classifier's with
            probability >= 1 - alpha; otherwise the row says -1 (abstain).
        batch_size: noisy samples per forward pass.
        seed: the noise seed, in [0, 2^32).
        skip: predict every skip-th point of the split.
        max: predict at most this many points of the split (None: all).
        out: the TSV written (default: predict/<checkpoint name>-<digest>_<split, or files>_n<n>.tsv).
        device: auto (a GPU if there is one), cpu or cuda.
    """

    split: Literal["test", "val", "train"] = "test"
    n: PositiveInt = 100_000
    alpha: OpenUnitInterval = 0.001
    batch_size: PositiveInt = 1000
    seed: Seed = 0
    skip: PositiveInt = 1
    max: Optional[PositiveInt] = None
    out: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self):
        for name, kind in (("n", PositiveInt), ("alpha", OpenUnitInterval), ("batch_size", PositiveInt),
                           ("seed", Seed), ("skip", PositiveInt)):
            setattr(self, name, check(kind, getattr(self, name), name))
        if self.max is not None:
            self.max = check(PositiveInt, self.max, "max")
        if self.split not in ("test", "val", "train") or self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"split must be test, val or train and device auto, cpu or cuda, got {self.split!r}, "
                             f"{self.device!r}")


def read_inputs(paths, input_shape) -> tuple[np.ndarray, list]:
    """(images [B, C, H, W] float32 in [0, 1], [(file, index)]) of image files (pixels 0-255) and ``.npy`` arrays
    ([C, H, W], [H, W] when C = 1, or a batch of them; floats in [0, 1] or uint8 0-255); UsageError otherwise."""
    images, where = [], []
    for path in map(Path, paths):
        try:
            array = _read(path, input_shape)
        except (OSError, ValueError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)
            raise UsageError(f"input {path}: {reason}") from None
        images.append(array)
        where += [(str(path), i) for i in range(len(array))]
    return np.concatenate(images).astype(np.float32), where


def _read(path: Path, input_shape) -> np.ndarray:
    c, h, w = input_shape
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.dtype == np.uint8:
            array = array / 255.0
        elif not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"holds {array.dtype} values; give floats in [0, 1] or uint8 (0-255)")
        elif not np.isfinite(array).all():
            raise ValueError("holds NaN or inf pixels")
        elif array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(f"pixels must be in [0, 1] (as the model was trained), found [{array.min():g}, "
                             f"{array.max():g}]")
        shape = tuple(array.shape)
        if shape in ((c, h, w), (h, w) if c == 1 else None):
            return array.reshape(1, c, h, w)
        if len(shape) > 1 and shape[0] > 0 and shape[1:] in ((c, h, w), (h, w) if c == 1 else None):
            return array.reshape(shape[0], c, h, w)
        raise ValueError(f"has shape {shape}; the model takes images [{c}, {h}, {w}] (or a batch [B, {c}, {h}, {w}])")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a NumPy .npy array")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if c == 1 else "RGB")
    except UnidentifiedImageError:
        raise ValueError("is not a readable image") from None
    if image.size != (w, h) or c not in (1, 3):
        raise ValueError(f"is {image.size[0]}x{image.size[1]}; the model takes {w}x{h} images with {c} channel(s)")
    array = np.asarray(image, dtype=np.float64) / 255.0
    return (array[None, None] if c == 1 else array.transpose(2, 0, 1)[None])


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--predict.device cuda: no CUDA device is available; use --predict.device cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def predict(ckpt_path, inputs=None, *, data_root: Optional[str] = None, **options) -> dict:
    """PREDICT each input (the ``inputs`` files, else the split) and write the TSV; returns its columns (NumPy)
    and ``out``. UsageError (one line) for bad options, checkpoints or files, before anything is written."""
    import torch

    from lightning_idrs.checkpoint import load_checkpoint
    from lightning_idrs.smoothing import ABSTAIN, PointNoise, SmoothedClassifier

    try:
        opts = PredictOptions(**options)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--predict.{one_line(error)}") from None
    device = _device(opts.device)
    loaded = load_checkpoint(ckpt_path, device, overrides={} if data_root is None else {"root": data_root})
    model = loaded.model
    if inputs:
        x, where = read_inputs(inputs, loaded.datamodule.input_shape)
        x, keys, labels = torch.from_numpy(x), np.arange(len(where)), None
    else:
        dataset = loaded.datamodule.split_dataset(opts.split)
        keys = np.arange(0, len(dataset), opts.skip)[: opts.max]
        x = torch.stack([dataset[int(i)][0] for i in keys])
        labels = np.asarray([int(dataset[int(i)][1]) for i in keys], dtype=np.int64)
    out = Path(opts.out) if opts.out else (Path("predict") / f"{Path(ckpt_path).stem}-{loaded.sha256[:8]}_"
                                           f"{'files' if inputs else opts.split}_n{opts.n}.tsv")
    if out.is_dir():
        raise UsageError(f"--predict.out {out} is a folder; name a file, e.g. predictions.tsv")
    smoothed = SmoothedClassifier(model.model, model.sigma, model.hparams.num_classes)
    predictions, sigmas = [], []
    with torch.inference_mode():
        for start in range(0, len(keys), _POINTS_PER_CALL):
            batch, chunk = x[start:start + _POINTS_PER_CALL].to(device), keys[start:start + _POINTS_PER_CALL]
            sigmas.append(model.sigma(batch).double().cpu().numpy().reshape(-1))
            predictions.append(smoothed.predict(batch, opts.n, opts.alpha, opts.batch_size, PointNoise(opts.seed, chunk)))
    predict_, sigma = np.concatenate(predictions).astype(np.int64), np.concatenate(sigmas)
    if inputs:
        columns = {"file": np.asarray([f for f, _ in where]), "index": np.asarray([i for _, i in where]),
                   "predict": predict_, "sigma": sigma}
    else:
        correct = ((predict_ == labels) & (predict_ != ABSTAIN)).astype(np.int64)
        columns = {"idx": keys, "label": labels, "predict": predict_, "correct": correct, "sigma": sigma}
    _write(out, columns)
    return {"out": out, **columns}


def _write(out: Path, columns: dict) -> None:
    from lightning_idrs.jsonfiles import write_text_atomic

    lines = ["\t".join(columns)] + ["\t".join(f"{v:.9g}" if isinstance(v, float) else str(v) for v in row)
                                    for row in zip(*(np.asarray(c).tolist() for c in columns.values()))]
    try:
        write_text_atomic(out, "\n".join(lines) + "\n")
    except OSError as error:
        raise UsageError(f"cannot write {out}: {error.strerror or one_line(error)}; choose another --predict.out") from None
