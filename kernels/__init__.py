"""Triton kernels of fastseg3d, installed as ``fastseg3d.kernels``.

Import this package only where Triton is installed: ``fastseg3d.ops`` imports it lazily. Triton reads
``TRITON_INTERPRET`` when the kernels here are decorated, i.e. at first import.
"""
