"""Scoring a saved model on a split of the data it was trained on."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from experiments.config import TrainConfig, resolve
from experiments.datasets import make_2d
from experiments.errors import ConfigError, DataError
from mlp.losses import softmax
from mlp.network import Network

SPLITS = ("train", "val", "test")
TEST_SEED_OFFSET = 1_000_003   # a 2D test set is a fresh draw, never the training draw


@dataclass
class Evaluation:
    """accuracy: fraction correct; confusion: (C, C) counts, rows = true class."""

    split: str
    accuracy: float
    confusion: np.ndarray
    class_names: list[str]
    views: str = ""          # "", "flip-averaged" or "tta": the test-time augmentation used

    @property
    def per_class_accuracy(self) -> np.ndarray:
        totals = self.confusion.sum(axis=1)
        return np.divide(np.diag(self.confusion), totals, out=np.full(len(totals), np.nan),
                         where=totals > 0)

    @property
    def count(self) -> int:
        return int(self.confusion.sum())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; entry [i, j] is how many of class i were predicted j."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2
                       ).reshape(num_classes, num_classes)


def model_config(net: Network) -> TrainConfig:
    """The resolved training config stored with a model by ``nnx train``."""
    stored = net.metadata.get("config")
    if not isinstance(stored, dict):
        raise DataError("the model file does not record the data it was trained on")
    try:
        return resolve(TrainConfig.from_dict(stored))
    except ConfigError as exc:
        raise DataError(f"the config stored with the model is not valid ({exc.option}: {exc})") from None


def split_arrays(net: Network, split: str, data_dir: str | None = None):
    """(X, y, class_names) of ``split`` for the data the model was trained on.

    CIFAR-10 images are normalised with the training statistics saved in the model.
    A 2D data set's test split is a fresh draw of the same generator.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}")
    config = model_config(net)
    if config.is_image:
        from experiments.cifar10 import default_data_dir, load_cifar10, load_cifar10_dataset, normalize
        if data_dir is not None:
            config.data_dir = data_dir
        if split == "test":
            data = load_cifar10(config.data_dir or default_data_dir())
            X = normalize(data.X_test, net.metadata["mean"], net.metadata["std"])
            return X, data.y_test, list(data.class_names)
        return _train_or_val(load_cifar10_dataset(config), split)
    if split == "test":
        ds = make_2d(config.data, config.points, config.classes, config.noise,
                     config.data_seed + TEST_SEED_OFFSET, 0.0)
        return ds.X_train, ds.y_train, ds.class_names
    ds = make_2d(config.data, config.points, config.classes, config.noise, config.data_seed,
                 config.val_size)
    if split == "val" and not len(ds.X_val):
        raise DataError("this model was trained without a validation split (--val-size 0)")
    return _train_or_val(ds, split)


def _train_or_val(ds, split: str):
    if split == "train":
        return ds.X_train, ds.y_train, ds.class_names
    return ds.X_val, ds.y_val, ds.class_names


def class_scores(net: Network, X: np.ndarray, flip_average: bool = False, tta: bool = False
                 ) -> np.ndarray:
    """Scores (N, C); with ``flip_average`` the mean of the softmax probabilities of
    each image and its left-right mirror; with ``tta`` airbench's weighted views."""
    if tta:
        return sum(weight * net.scores(view) for weight, view in tta_views(X))
    if not flip_average:
        return net.scores(X)
    return (softmax(net.scores(X)) + softmax(net.scores(X[..., ::-1]))) / 2


def tta_views(X: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """airbench's test-time augmentation (its level 2) as (weight, view) pairs whose
    weighted logits are summed: each image and its mirror (1/4 each), and both of
    them moved one pixel up-left and one pixel down-right with the border reflected
    (1/8 each). X: (N, C, H, W) -> six views of the same shape."""
    h, w = X.shape[2:]
    padded = np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    views = [(0.25, X), (0.125, padded[:, :, :h, :w]), (0.125, padded[:, :, 2:, 2:])]
    return [(weight, v) for weight, view in views for v in (view, view[..., ::-1])]


def evaluate(net: Network, split: str = "test", data_dir: str | None = None,
             flip_average: bool = False, tta: bool = False) -> Evaluation:
    X, y, class_names = split_arrays(net, split, data_dir)
    if net.input_shape is not None and tuple(X.shape[1:]) != tuple(net.input_shape):
        raise DataError(f"the model takes inputs of shape {tuple(net.input_shape)}, but its data set "
                        f"{net.metadata.get('data')!r} gives {tuple(X.shape[1:])}")
    if (flip_average or tta) and X.ndim != 4:
        raise ValueError("test-time augmentation needs image data")
    predictions = class_scores(net, X, flip_average, tta).argmax(axis=1)
    confusion = confusion_matrix(y, predictions, len(class_names))
    views = "tta" if tta else "flip-averaged" if flip_average else ""
    return Evaluation(split, float(np.mean(predictions == y)), confusion, class_names, views)
