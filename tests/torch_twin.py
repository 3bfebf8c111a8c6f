"""A PyTorch copy of an nnx network, for the tests that use PyTorch as an oracle.

The tests' own mirror, so that they never import the benchmarks: every nnx layer
maps to the torch module that computes the same function, and the copy starts
from the nnx network's parameters and running statistics.
"""
from __future__ import annotations

import numpy as np


def torch_twin(net, torch):
    """``net`` (an nnx Network) as a ``torch.nn.Sequential`` with the same weights.

    Layouts differ in one place only: an nnx Linear holds W as (in, out), torch's
    weight is (out, in). BatchNorm's decay weighs the old running value in nnx
    and the new batch statistic in torch.
    """
    nn = torch.nn
    modules, flat = [], False
    for layer in net.layers:
        kind = layer.kind
        if kind in ("linear", "flatten"):
            modules.append(nn.Flatten())      # an nnx Linear flattens its input itself
            flat = True
        if kind == "conv2d":
            modules.append(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                     layer.stride, layer.padding))
        elif kind == "maxpool2d":
            modules.append(nn.MaxPool2d(layer.pool_size, layer.stride))
        elif kind == "batchnorm":
            norm = nn.BatchNorm1d if flat else nn.BatchNorm2d
            modules.append(norm(layer.num_features, eps=layer.eps, momentum=1.0 - layer.decay))
        elif kind == "linear":
            modules.append(nn.Linear(layer.in_features, layer.out_features))
        elif kind == "relu":
            modules.append(nn.ReLU())
        elif kind == "leaky_relu":
            modules.append(nn.LeakyReLU(layer.alpha))
        elif kind == "tanh":
            modules.append(nn.Tanh())
        elif kind == "sigmoid":
            modules.append(nn.Sigmoid())
        elif kind == "dropout":
            modules.append(nn.Dropout(layer.p))
        elif kind != "flatten":
            raise ValueError(f"no PyTorch twin for layer {kind!r}")
    twin = nn.Sequential(*modules).to(torch.float64 if net.dtype == np.float64 else torch.float32)
    with torch.no_grad():
        for layer, module in _weighted(net, twin, torch):
            module.weight.copy_(torch.from_numpy(_torch_layout(layer, layer.params[_WEIGHT[layer.kind]])))
            module.bias.copy_(torch.from_numpy(layer.params[_BIAS[layer.kind]]))
            if layer.kind == "batchnorm":
                module.running_mean.copy_(torch.from_numpy(layer.buffers["running_mean"]))
                module.running_var.copy_(torch.from_numpy(layer.buffers["running_var"]))
    return twin


def twin_grads(net, twin, torch) -> dict[str, np.ndarray]:
    """The twin's parameter gradients under nnx's names (``net.params``) and layouts."""
    grads = {}
    for layer, module in _weighted(net, twin, torch):
        index = next(i for i, other in enumerate(net.layers) if other is layer)
        prefix = f"{index}.{layer.kind}."
        grads[prefix + _WEIGHT[layer.kind]] = _torch_layout(layer, module.weight.grad.numpy())
        grads[prefix + _BIAS[layer.kind]] = module.bias.grad.numpy()
    return grads


# ---- internals -----------------------------------------------------------------------
_WEIGHT = {"conv2d": "W", "linear": "W", "batchnorm": "gamma"}
_BIAS = {"conv2d": "b", "linear": "b", "batchnorm": "beta"}


def _weighted(net, twin, torch) -> list:
    """(nnx layer, torch module) for every layer with parameters, in order."""
    nn = torch.nn
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
    return list(zip([layer for layer in net.layers if layer.params],
                    [m for m in twin if isinstance(m, kinds)], strict=True))


def _torch_layout(layer, array: np.ndarray) -> np.ndarray:
    """(in, out) <-> (out, in) for a Linear's weight; other arrays are laid out alike."""
    return np.ascontiguousarray(array.T if layer.kind == "linear" and array.ndim == 2 else array)
