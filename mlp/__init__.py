"""nnx core: neural networks in NumPy, one forward()/backward() pair per layer."""

__version__ = "0.1.0"
