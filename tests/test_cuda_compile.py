"""Every CUDA kernel translation unit compiles with plain nvcc, no torch, for sm_80 and sm_90a.

This is the check CI can run without a GPU: it proves the kernels build for both targets from the
CUDA toolkit alone (the .cu files must not include torch headers). Numerics need a GPU and are
covered by the shared backend grid in test_attention.py.
"""
import pathlib
import shutil
import subprocess

import pytest

CUDA_SOURCES = sorted((pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))
ARCH_FLAGS = {
    "sm_80": ["-arch=sm_80"],
    "sm_90a": ["-gencode", "arch=compute_90a,code=sm_90a"],
}
NVCC = shutil.which("nvcc")


def test_kernel_sources_found():
    assert {p.name for p in CUDA_SOURCES} >= {"flash_fwd.cu", "flash_bwd.cu"}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", sorted(ARCH_FLAGS))
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_compiles_with_nvcc(source, arch, tmp_path):
    command = [NVCC, "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o"), *ARCH_FLAGS[arch], "-O3"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
