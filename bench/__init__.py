"""Benchmarks of fastseg3d's kernels against their peers (not installed with the package)."""
