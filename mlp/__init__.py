"""nnx core: neural networks in NumPy, one forward()/backward() pair per layer."""

from mlp._allocator import keep_freed_arrays_in_the_heap

__version__ = "0.1.0"

keep_freed_arrays_in_the_heap()
