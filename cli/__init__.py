"""The nnx command-line interface (Typer)."""
