"""Compact convnet architectures: a dash-separated spec such as ``conv16x5-pool2-fc10``.

Tokens, left to right (input is (C, H, W) images):

  convFxK        conv layer, F filters of KxK, stride 1, "same" padding (K-1)//2
  convFxKsSpP    ... with stride S and/or padding P, e.g. conv32x3s2p1, conv8x5p0
  poolK          max-pool KxK, stride K (poolKsS for another stride)
  bn             batch normalization of the previous layer's features/channels
  fcN            fully-connected layer with N outputs (flattens its input)
  whitenK        a frozen KxK patch-whitening conv (``Whiten``), no padding; first only
  relu, gelu, tanh  an explicit activation
  act            the network's activation (``activation``), placed explicitly
  dropoutP       dropout with drop probability P, e.g. dropout0.5
  scaleF         multiply by F, e.g. scale0.1111 after the last fc (airbench's head)
  flatten        flatten (N, C, H, W) to (N, C*H*W); optional, fc flattens anyway

The network's activation (ReLU unless ``activation`` says otherwise) follows
every conv, whiten and fc automatically, except the final fc (the class
scores). If ``bn`` directly follows a conv/fc, the activation goes after the bn
(conv-bn-relu). A pool right after a conv (or its bn) comes before that
activation: max-pooling commutes with ReLU, which then touches a quarter of the
numbers, and conv-pool-bn-act is airbench's order whatever the activation; so
``conv32x3-pool2-bn`` is conv, pool, bn, act. An explicit activation right after
a conv/fc (or its bn, or its pool) replaces the automatic one. The spec's last
fc must have num_classes outputs (only scale tokens may follow it); a spec with
no fc at its end gets ``fc{num_classes}`` appended.

Presets (pass the name instead of a spec):
  convnetjs       conv16x5-pool2-conv20x5-pool2-conv20x5-pool2-fc10  (ConvNetJS CIFAR-10 demo)
  cs231n-3layer   conv32x7-pool2-fc100-fc10  (cs231n ThreeLayerConvNet: conv-relu-pool-fc-relu-fc)
  conv6bn         conv32x3-pool2-bn-conv32x3-bn-conv64x3-pool2-bn-conv64x3-bn-
                  conv128x3-pool2-bn-conv128x3-bn-pool4-fc10  (six conv-bn-relu layers
                  in three blocks)
  airbench94      whiten2-conv64x3-pool2-bn-conv64x3-bn-conv256x3-pool2-bn-conv256x3-bn-
                  conv256x3-pool2-bn-conv256x3-bn-act-pool3-fc10-scale0.11111
                  (Keller Jordan's airbench94: a whitening layer, then conv groups of
                  widths 64/256/256, a 3x3 max-pool and a head scaled by 1/9; the
                  network of the airbench94 recipe)
  airbench93      the same with widths 64/128/128 (airbench93's)
"""
from __future__ import annotations

import re

import numpy as np

from mlp.conv import BatchNorm, Conv2D, MaxPool2D, Whiten
from mlp.layers import (
    ACTIVATIONS,
    GELU,
    Dropout,
    Flatten,
    Layer,
    Linear,
    ReLU,
    Scale,
    Tanh,
    check_drop_probability,
)
from mlp.network import Network

PRESETS = {
    "convnetjs": "conv16x5-pool2-conv20x5-pool2-conv20x5-pool2-fc10",
    "cs231n-3layer": "conv32x7-pool2-fc100-fc10",
    # Three blocks of conv-pool-bn-relu, conv-bn-relu (airbench's block order:
    # pooling before bn and relu shrinks both fourfold), then a global max-pool.
    "conv6bn": "conv32x3-pool2-bn-conv32x3-bn-conv64x3-pool2-bn-conv64x3-bn-"
               "conv128x3-pool2-bn-conv128x3-bn-pool4-fc10",
    # airbench's conv groups: conv, pool, bn, act, conv, bn, act. The last group's act
    # comes before the final pool (GELU does not commute with max-pooling).
    "airbench94": "whiten2-conv64x3-pool2-bn-conv64x3-bn-conv256x3-pool2-bn-conv256x3-bn-"
                  "conv256x3-pool2-bn-conv256x3-bn-act-pool3-fc10-scale0.11111",
    "airbench93": "whiten2-conv64x3-pool2-bn-conv64x3-bn-conv128x3-pool2-bn-conv128x3-bn-"
                  "conv128x3-pool2-bn-conv128x3-bn-act-pool3-fc10-scale0.11111",
}

EXPLICIT_ACTIVATIONS = {"relu": ReLU, "gelu": GELU, "tanh": Tanh}

_TOKENS = [
    ("conv", re.compile(r"conv(\d+)x(\d+)(?:s(\d+))?(?:p(\d+))?")),
    ("pool", re.compile(r"pool(\d+)(?:s(\d+))?")),
    ("fc", re.compile(r"fc(\d+)")),
    ("dropout", re.compile(r"dropout(\d*\.?\d+)")),
    ("bn", re.compile(r"bn")),
    ("relu", re.compile(r"relu")),
    ("tanh", re.compile(r"tanh")),
    ("gelu", re.compile(r"gelu")),
    ("act", re.compile(r"act")),
    ("whiten", re.compile(r"whiten(\d+)")),
    ("scale", re.compile(r"scale(\d*\.?\d+(?:e-?\d+)?)")),
    ("flatten", re.compile(r"flatten")),
]


def resolve_arch(name_or_spec: str) -> str:
    """A preset's spec, or the argument itself (stripped) when it is not a preset name."""
    name_or_spec = name_or_spec.strip()
    return PRESETS.get(name_or_spec, name_or_spec)


def parse_arch(spec: str) -> list[tuple[str, tuple]]:
    """``"conv16x5-pool2-fc10"`` -> [("conv", (16, 5, 1, 2)), ("pool", (2, 2)), ("fc", (10,))].

    conv args are (filters, kernel, stride, padding); pool args (size, stride).
    Raises ValueError naming the bad token.
    """
    tokens = []
    for raw in spec.strip().lower().split("-"):
        for kind, pattern in _TOKENS:  # noqa: B007  the matching kind is used below
            m = pattern.fullmatch(raw)
            if m:
                break
        else:
            raise ValueError(f"bad architecture token {raw!r} in {spec!r}; expected convFxK[sS][pP], "
                             f"poolK[sS], fcN, bn, whitenK, relu, gelu, tanh, act, dropoutP, scaleF "
                             f"or flatten")
        if kind == "conv":
            f, k = int(m[1]), int(m[2])
            args = (f, k, int(m[3] or 1), int(m[4]) if m[4] is not None else (k - 1) // 2)
            if f < 1 or k < 1 or args[2] < 1:
                raise ValueError(f"bad architecture token {raw!r}: filters, kernel and stride must be >= 1")
        elif kind == "pool":
            args = (int(m[1]), int(m[2] or m[1]))
            if min(args) < 1:
                raise ValueError(f"bad architecture token {raw!r}: pool size and stride must be >= 1")
        elif kind == "fc":
            args = (int(m[1]),)
            if args[0] < 1:
                raise ValueError(f"bad architecture token {raw!r}: fc needs at least 1 output")
        elif kind == "dropout":
            args = (float(m[1]),)
            try:
                check_drop_probability(args[0])
            except ValueError as exc:
                raise ValueError(f"bad architecture token {raw!r}: {exc}") from None
        elif kind == "whiten":
            args = (int(m[1]),)
            if args[0] < 1:
                raise ValueError(f"bad architecture token {raw!r}: the patch size must be >= 1")
            if tokens:
                raise ValueError(f"bad architecture token {raw!r}: whitening is the first layer only")
        elif kind == "scale":
            args = (float(m[1]),)
            if args[0] == 0:
                raise ValueError(f"bad architecture token {raw!r}: a scale of 0 erases everything")
        else:
            args = ()
        tokens.append((kind, args))
    if not tokens:
        raise ValueError("empty architecture spec")
    return tokens


def build_convnet(arch: str, input_shape: tuple, num_classes: int, *, seed: int = 0,
                  dtype=np.float32, loss: str = "softmax", reg: float = 0.0, init: str = "he",
                  weight_scale: float = 1e-2, activation: str = "relu", bn_decay: float = 0.9,
                  bn_eps: float = 1e-5) -> Network:
    """The network a spec (or preset name) describes, for inputs of ``input_shape`` (C, H, W).

    ``activation`` is the automatic (and ``act``) activation, a name of
    ``mlp.layers.ACTIVATIONS``; ``bn_decay``/``bn_eps`` go to every BatchNorm.
    Shapes are propagated layer by layer, so a conv whose sizes do not divide
    or a pool larger than its input raises ValueError naming the layer. The
    first conv skips its input gradient (``Conv2D(input_grad=False)``): images
    are data, not parameters, so ``Network.backward`` then returns None. A
    whitening layer's filters are zero until ``Whiten.fit``. The resolved spec
    is kept in ``net.metadata["arch"]``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    spec = resolve_arch(arch)
    tokens = parse_arch(spec)
    last_fc = max((i for i, (kind, _) in enumerate(tokens) if kind == "fc"), default=None)
    if last_fc is None or any(kind != "scale" for kind, _ in tokens[last_fc + 1:]):
        tokens.append(("fc", (num_classes,)))
        spec, last_fc = f"{spec}-fc{num_classes}", len(tokens) - 1
    if tokens[last_fc][1][0] != num_classes:
        raise ValueError(f"the last fc of {spec!r} is fc{tokens[last_fc][1][0]}, but the data has "
                         f"{num_classes} classes: end the spec with fc{num_classes}")
    init_rng, dropout_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    shape = tuple(int(d) for d in input_shape)
    layers: list[Layer] = []
    pending = False  # a conv/fc's activation waits: a bn or pool may come first, or an explicit one

    def add(layer, name):
        nonlocal shape
        try:
            shape = layer.output_shape(shape)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"layer {len(layers) + 1} ({name}) of {spec!r} on input {shape}: "
                             f"{exc}") from None
        layers.append(layer)

    for i, (kind, args) in enumerate(tokens):
        name = kind + "x".join(f"{a:g}" if isinstance(a, float) else str(a) for a in args[:2])
        if kind == "bn":
            if len(shape) not in (1, 3):
                raise ValueError(f"bn in {spec!r} needs (D,) or (C, H, W) features, got {shape}")
            add(BatchNorm(shape[0], bn_decay, bn_eps, dtype=dtype), name)  # the activation waits
            continue
        if kind in EXPLICIT_ACTIVATIONS or kind == "act":
            pending = False  # the explicit activation replaces the automatic one
            layers.append(EXPLICIT_ACTIVATIONS[kind]() if kind != "act" else ACTIVATIONS[activation]())
            continue
        if pending and kind != "pool":  # any other token ends the conv/fc (+ bn) block
            layers.append(ACTIVATIONS[activation]())
            pending = False
        if kind in ("conv", "pool", "whiten") and len(shape) != 3:
            raise ValueError(f"{name} in {spec!r} needs (C, H, W) input, got {shape}")
        if kind == "conv":
            f, k, s, p = args
            add(Conv2D(shape[0], f, k, s, p, init=init, weight_scale=weight_scale, rng=init_rng,
                       dtype=dtype, input_grad=bool(layers)), name)
            pending = True
        elif kind == "whiten":
            add(Whiten(shape[0], args[0], dtype=dtype), name)
            pending = True
        elif kind == "pool":
            add(MaxPool2D(*args), name)
        elif kind == "fc":
            add(Linear(int(np.prod(shape)), args[0], init=init, weight_scale=weight_scale,
                       rng=init_rng, dtype=dtype), name)
            pending = i != last_fc  # the final fc gives the scores: no activation
        elif kind == "dropout":
            add(Dropout(args[0], rng=dropout_rng), name)
        elif kind == "scale":
            add(Scale(args[0]), name)
        elif kind == "flatten":
            add(Flatten(), name)
    return Network(layers, loss=loss, reg=reg, input_shape=tuple(input_shape), dtype=dtype,
                   metadata={"arch": spec})
