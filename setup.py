"""Build hook for the optional CUDA extension ``fastseg3d._C``.

Everything in fastseg3d works without it. It is built only when ``FASTSEG3D_BUILD_CUDA=1`` and a CUDA
build of torch plus ``nvcc`` are present (``pip install -e . --no-build-isolation``); ``TORCH_CUDA_ARCH_LIST``
and ``MAX_JOBS`` are honoured by torch's build helpers. Nothing is ever downloaded here.
"""

import glob
import os
import warnings

from setuptools import setup


def _cuda_extension():
    if os.environ.get("FASTSEG3D_BUILD_CUDA", "0") != "1":
        return {}
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    if not sources:
        warnings.warn("FASTSEG3D_BUILD_CUDA=1 but csrc/ has no sources yet; skipping the extension")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        warnings.warn("FASTSEG3D_BUILD_CUDA=1 needs torch installed first and --no-build-isolation; skipping")
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        warnings.warn("FASTSEG3D_BUILD_CUDA=1 but torch has no CUDA or CUDA_HOME is unset; skipping")
        return {}
    ext = CUDAExtension(
        name="fastseg3d._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_cuda_extension())
