"""Triton kernels of fastseg3d, installed as ``fastseg3d.kernels``.

Import this package only where Triton is installed: ``fastseg3d.ops`` imports it lazily. Triton reads
``TRITON_INTERPRET`` when the kernels here are decorated, i.e. at first import.
"""

import os

# The kernels' accumulations are written as ``a * b + c`` and rely on Triton contracting them into FMAs (half the
# instructions of the hot loops). Triton 3.9 announces that this default turns off in 3.10: keep it on unless the
# user has chosen otherwise. Launch options cannot carry it: torch.compile rejects unknown launch keywords.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
