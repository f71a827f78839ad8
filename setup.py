"""fused-attention: `pip install --no-build-isolation -e .` (torch must already be installed).

The C++ extension ``attention._C`` is built from csrc/:
- with the CUDA kernels when torch is a CUDA build and a CUDA toolkit is found
  (or FUSED_ATTENTION_FORCE_CUDA=1), for TORCH_CUDA_ARCH_LIST (default "8.0;9.0");
- else with the C++ CPU kernels only;
- else (no C++ compiler, or FUSED_ATTENTION_NO_EXTENSION=1) not at all: the package is pure Python
  and the "cpu"/"cuda" backends report themselves unavailable, with the reason.
MAX_JOBS bounds the parallel compile jobs.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_toolkit_usable(torch, cpp_extension):
    """A CUDA build of torch, and a toolkit with the cuBLAS headers that torch's CUDA headers include."""
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    if _cublas_include_dir(cpp_extension.CUDA_HOME) is None:
        print("fused-attention: the CUDA toolkit has no cuBLAS headers, building the CPU kernels only")
        return False
    return True


def _cublas_include_dir(cuda_home):
    """The toolkit's include dir, or that of the nvidia-cublas wheel CUDA builds of torch depend on."""
    candidates = [os.path.join(cuda_home, "include")]
    spec = importlib.util.find_spec("nvidia.cublas") if importlib.util.find_spec("nvidia") else None
    if spec is not None:
        candidates += [os.path.join(p, "include") for p in spec.submodule_search_locations]
    return next((d for d in candidates if os.path.exists(os.path.join(d, "cublas_v2.h"))), None)


def _extension():
    if os.environ.get("FUSED_ATTENTION_NO_EXTENSION") == "1":
        print("fused-attention: FUSED_ATTENTION_NO_EXTENSION=1, installing without the C++ extension")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("fused-attention: no C++ compiler found, installing without the C++ extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils import cpp_extension

    with_cuda = os.environ.get("FUSED_ATTENTION_FORCE_CUDA") == "1" or _cuda_toolkit_usable(torch, cpp_extension)
    cxx_flags = ["-O3", "-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        ext = cpp_extension.CUDAExtension(
            "attention._C",
            sources,
            include_dirs=[d for d in [_cublas_include_dir(cpp_extension.CUDA_HOME)] if d],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "attention._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    print(f"fused-attention: building attention._C ({'CPU + CUDA' if with_cuda else 'CPU'} kernels)")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension()

setup(
    name="fused-attention",
    version="0.1.0",
    description="Fused flash-style attention kernels in Triton and CUDA C++, as PyTorch autograd ops",
    packages=["attention", "attention.models", "attention.triton_kernels"],
    package_dir={"attention.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "triton; platform_system == 'Linux'"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "bench": ["matplotlib", "tqdm"]},
)
