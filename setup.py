"""fused-attention: `pip install --no-build-isolation -e .` (torch must already be installed).

The C++ extension ``attention._C`` is built from csrc/:
- with the CUDA kernels when torch is a CUDA build and a CUDA toolkit of the same major version is
  found, together with every header torch's CUDA headers include (or FUSED_ATTENTION_FORCE_CUDA=1,
  which turns any of these problems into an error instead);
- else with the C++ CPU kernels only, printing one line that says why (`pip install -v` shows it);
- else (no C++ compiler, or FUSED_ATTENTION_NO_EXTENSION=1) not at all: the package is pure Python
  and the "cpu"/"cuda" backends report themselves unavailable, with the reason.
CUDA targets: TORCH_CUDA_ARCH_LIST when set, else the visible GPUs' compute capabilities, else
"8.0;9.0+PTX" (the PTX lets newer GPUs JIT-compile the kernels), less anything older than 8.0.
MAX_JOBS bounds the compile jobs.
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The headers from outside torch that torch's CUDA headers include where csrc/cuda/binding.cpp
# includes them (ATen/cuda/CUDAContext.h, c10/cuda/*): cuBLAS, cuBLASLt, cuSPARSE and cuSOLVER come
# from separate nvidia-* wheels, not from every toolkit. .ci/cuda_build.sh checks this list against
# what the compiler actually opens, so a new torch that includes more shows up in CI.
TORCH_CUDA_HEADERS = (
    "cuda.h",
    "cuda_runtime.h",
    "cuda_runtime_api.h",
    "cublas_v2.h",
    "cublasLt.h",
    "cusparse.h",
    "cusolverDn.h",
    "cusolver_common.h",
)
MIN_COMPUTE_CAPABILITY = (8, 0)  # mma.sync bf16 and cp.async
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _wheel_include_dirs():
    """Include dirs of the nvidia-* wheels CUDA builds of torch depend on: cu13 puts every header in
    nvidia/cu13/include, cu12 has one dir per library (nvidia/cublas/include, nvidia/cusparse/include...)."""
    nvidia = importlib.util.find_spec("nvidia")
    roots = nvidia.submodule_search_locations if nvidia is not None else []
    return [d for root in roots for d in sorted(glob.glob(os.path.join(root, "*", "include")))]


def _find_headers(cuda_home):
    """{header: the first dir holding it} for TORCH_CUDA_HEADERS, looking in the toolkit, the
    compiler's CPATH / CPLUS_INCLUDE_PATH, then the nvidia-* wheels. Missing headers map to None."""
    env_dirs = [d for var in ("CPATH", "CPLUS_INCLUDE_PATH") for d in os.environ.get(var, "").split(":") if d]
    dirs = [os.path.join(cuda_home, "include"), *env_dirs, *_wheel_include_dirs()]
    return {h: next((d for d in dirs if os.path.exists(os.path.join(d, h))), None) for h in TORCH_CUDA_HEADERS}


def _toolkit_version(cuda_home):
    """'13.0' from `nvcc --version`, or None when nvcc is missing or says something else."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _visible_capabilities(torch):
    """The distinct compute capabilities of the visible GPUs, oldest first (empty without a GPU)."""
    if not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def _older_than_supported(entry):
    """Whether a TORCH_CUDA_ARCH_LIST entry ("7.5", "9.0a+PTX") is older than the kernels support;
    named ones ("Hopper") are left to torch."""
    version = re.match(r"(\d+)\.(\d+)", entry)
    return version is not None and (int(version[1]), int(version[2])) < MIN_COMPUTE_CAPABILITY


def _cuda_arch_list(capabilities):
    """(TORCH_CUDA_ARCH_LIST to build with, where it came from): the user's, else the visible GPUs'
    with PTX of the newest, else the default; less what is older than 8.0, which the kernels cannot be
    compiled for (images often set lists from 5.2 up). Empty when nothing is left."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        user = os.environ["TORCH_CUDA_ARCH_LIST"]
        entries, origin = user.replace(" ", ";").split(";"), f"TORCH_CUDA_ARCH_LIST is {user!r}"
    elif capabilities:
        entries = [f"{major}.{minor}" for major, minor in capabilities]
        origin = f"the visible GPUs have compute capability {', '.join(entries)}"
        entries[-1] += "+PTX"  # the driver JIT-compiles PTX for GPUs newer than any listed
    else:
        entries, origin = DEFAULT_CUDA_ARCH_LIST.split(";"), "the default"
    return ";".join(e for e in entries if e and not _older_than_supported(e)), origin


def _cuda_problem(torch, cuda_home, arch_list, arch_origin):
    """Why the CUDA kernels cannot be built here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    # Unset, CUDA_HOME is torch's guess from the nvcc on PATH, wrong when that nvcc is a wrapper script.
    if not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h: set CUDA_HOME to the CUDA toolkit (as /usr/local/cuda)"
    toolkit = _toolkit_version(cuda_home)
    if toolkit is None:
        return f"cannot run {os.path.join(cuda_home, 'bin', 'nvcc')} --version"
    if toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"the CUDA toolkit at {cuda_home} is CUDA {toolkit} but torch {torch.__version__} was built "
                f"with CUDA {torch.version.cuda}: their major versions must match")
    missing = [h for h, d in _find_headers(cuda_home).items() if d is None]
    if missing:
        return (f"torch's CUDA headers include {', '.join(missing)}, found neither in {cuda_home}/include, "
                "CPATH nor the nvidia-* wheels")
    if not arch_list:
        return f"nothing to build for: the CUDA kernels need compute capability 8.0 or newer, and {arch_origin}"
    return None


def _cuda_targets(cpp_extension):
    """What nvcc compiles for, as 'sm_80' (a binary) or 'compute_90' (PTX), read back from the
    -gencode flags torch derives from TORCH_CUDA_ARCH_LIST: the very flags BuildExtension passes."""
    return [flag.rsplit("code=", 1)[1] for flag in cpp_extension._get_cuda_arch_flags()]


def _cuda_extension(cpp_extension, sources, cxx_flags, cuda_home):
    targets = _cuda_targets(cpp_extension)
    # binding.cpp reports the targets (torch.ops.fused_attention.cuda_targets), so that the cuda
    # backend can tell a GPU it has no kernel image for. Commas, not ';': the flag goes through a shell.
    cxx_flags = cxx_flags + [f"-DFUSED_ATTENTION_CUDA_TARGETS={','.join(targets)}"]
    # Headers the toolkit lacks come from the wheels, searched after every other dir (-idirafter),
    # so that the toolkit's own cuda_runtime.h is never shadowed by a wheel's copy.
    toolkit_include = os.path.join(cuda_home, "include")
    for d in dict.fromkeys(d for d in _find_headers(cuda_home).values() if d != toolkit_include):
        cxx_flags += ["-idirafter", d]
    print(f"fused-attention: building attention._C (CPU + CUDA kernels for {', '.join(targets)})")
    return cpp_extension.CUDAExtension(
        "attention._C",
        sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


def _extension():
    if os.environ.get("FUSED_ATTENTION_NO_EXTENSION") == "1":
        print("fused-attention: FUSED_ATTENTION_NO_EXTENSION=1, installing without the C++ extension")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("fused-attention: no C++ compiler found, installing without the C++ extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cxx_flags = ["-O3", "-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    arch_list, arch_origin = _cuda_arch_list(_visible_capabilities(torch))
    problem = _cuda_problem(torch, cpp_extension.CUDA_HOME, arch_list, arch_origin)
    forced = os.environ.get("FUSED_ATTENTION_FORCE_CUDA") == "1"
    if problem is not None and forced:
        raise RuntimeError(f"fused-attention: FUSED_ATTENTION_FORCE_CUDA=1, but {problem}")
    if problem is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        ext = _cuda_extension(cpp_extension, sources, cxx_flags, cpp_extension.CUDA_HOME)
    else:
        # Not an error: the CPU kernels and the Triton backend still work.
        print(f"fused-attention: building attention._C with the CPU kernels only: {problem}")
        ext = cpp_extension.CppExtension(
            "attention._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


# Run as __main__ by pip and `python setup.py`; imported by tests/test_setup.py for its helpers.
if __name__ == "__main__":
    ext_modules, cmdclass = _extension()

    setup(
        name="fused-attention",
        version="0.1.0",
        description="Fused flash-style attention kernels in Triton and CUDA C++, as PyTorch autograd ops",
        packages=["attention", "attention.integrations", "attention.models", "attention.triton_kernels"],
        package_dir={"attention.triton_kernels": "triton_kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        python_requires=">=3.10",
        install_requires=["torch>=2.4", "numpy", "triton; platform_system == 'Linux'"],
        extras_require={"test": ["pytest", "pytest-benchmark"], "bench": ["matplotlib", "tqdm"],
                        # attention.integrations.transformers, an attn_implementation for Hugging Face models
                        "transformers": ["transformers>=5.0"]},
    )
