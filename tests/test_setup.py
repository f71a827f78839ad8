"""setup.py's decisions, with fake toolkits: when the CUDA kernels are built, for which GPUs, and the
one-line reason or the error when they are not. (The real CUDA build runs in .ci/cuda_build.sh.)"""
import importlib.util
import pathlib
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fused_attention_setup", ROOT / "setup.py")
setup_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_py)  # not __main__: defines the helpers, runs no setup()


def fake_torch(cuda):
    return types.SimpleNamespace(__version__="2.14.1", version=types.SimpleNamespace(cuda=cuda))


def fake_toolkit(root, release, headers=("cuda.h", "cuda_runtime.h", "cuda_runtime_api.h")):
    """A CUDA_HOME whose bin/nvcc reports `release` and whose include/ holds `headers`."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    (root / "include").mkdir()
    for header in headers:
        (root / "include" / header).touch()
    return str(root)


@pytest.fixture
def wheel_include(tmp_path, monkeypatch):
    """An empty nvidia-* wheel include dir, the only one setup.py sees."""
    include = tmp_path / "site-packages" / "nvidia" / "cu13" / "include"
    include.mkdir(parents=True)
    monkeypatch.setattr(setup_py, "_wheel_include_dirs", lambda: [str(include)])
    monkeypatch.delenv("CPATH", raising=False)
    monkeypatch.delenv("CPLUS_INCLUDE_PATH", raising=False)
    return include


def problem(torch, cuda_home, arch_list="8.0;9.0+PTX"):
    return setup_py._cuda_problem(torch, cuda_home, arch_list, "the default")


def test_cpu_torch():
    assert problem(fake_torch(None), "/usr/local/cuda") == "torch 2.14.1 is not a CUDA build"


def test_no_toolkit():
    assert problem(fake_torch("13.0"), None).startswith("no CUDA toolkit found")


def test_cuda_home_without_headers(tmp_path):
    home = fake_toolkit(tmp_path / "local", "13.0", headers=())  # what torch guesses from a wrapper nvcc
    assert problem(fake_torch("13.0"), home) == (
        f"CUDA_HOME={home} has no include/cuda_runtime.h: set CUDA_HOME to the CUDA toolkit (as /usr/local/cuda)"
    )


def test_toolkit_and_torch_cuda_major_differ(tmp_path, wheel_include):
    home = fake_toolkit(tmp_path / "cuda", "12.4")
    assert problem(fake_torch("13.0"), home) == (
        f"the CUDA toolkit at {home} is CUDA 12.4 but torch 2.14.1 was built with CUDA 13.0: "
        "their major versions must match"
    )


def test_missing_library_headers_are_named(tmp_path, wheel_include):
    home = fake_toolkit(tmp_path / "cuda", "13.0")
    (wheel_include / "cublas_v2.h").touch()
    found = problem(fake_torch("13.0"), home)
    assert found.startswith("torch's CUDA headers include cublasLt.h, cusparse.h, cusolverDn.h, cusolver_common.h,")


def test_wheel_headers_complete_the_toolkit(tmp_path, wheel_include):
    home = fake_toolkit(tmp_path / "cuda", "13.1")  # minor versions may differ
    for header in setup_py.TORCH_CUDA_HEADERS:
        (wheel_include / header).touch()
    assert problem(fake_torch("13.0"), home) is None
    found = setup_py._find_headers(home)
    assert found["cuda_runtime.h"] == f"{home}/include"  # the toolkit's own, never a wheel's copy
    assert found["cusparse.h"] == str(wheel_include)


def test_nothing_to_build_for(tmp_path, wheel_include):
    home = fake_toolkit(tmp_path / "cuda", "13.0", headers=setup_py.TORCH_CUDA_HEADERS)
    arch_list, origin = setup_py._cuda_arch_list([(7, 5)])
    assert setup_py._cuda_problem(fake_torch("13.0"), home, arch_list, origin) == (
        "nothing to build for: the CUDA kernels need compute capability 8.0 or newer, "
        "and the visible GPUs have compute capability 7.5"
    )


@pytest.mark.parametrize(
    "capabilities,user_list,arch_list",
    [
        ([], None, "8.0;9.0+PTX"),  # no GPU: Ampere and Hopper binaries, Hopper PTX for anything newer
        ([(8, 6)], None, "8.6+PTX"),
        ([(7, 5), (9, 0), (12, 0)], None, "9.0;12.0+PTX"),  # the kernels cannot be compiled below 8.0
        ([(9, 0)], "8.9", "8.9"),  # the user's list wins
        ([], "5.2 6.0 7.5 8.0 8.6 9.0+PTX", "8.0;8.6;9.0+PTX"),  # as container images set it
        ([], "7.0;7.5+PTX", ""),
        ([], "Hopper", "Hopper"),  # torch expands the names
    ],
)
def test_arch_list(capabilities, user_list, arch_list, monkeypatch):
    if user_list is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", user_list)
    assert setup_py._cuda_arch_list(capabilities)[0] == arch_list


def test_forced_cuda_build_fails_clearly(monkeypatch):
    monkeypatch.setenv("FUSED_ATTENTION_FORCE_CUDA", "1")
    monkeypatch.setattr(setup_py, "_cuda_problem", lambda *args: "no CUDA toolkit found (set CUDA_HOME ...)")
    with pytest.raises(RuntimeError, match=r"FUSED_ATTENTION_FORCE_CUDA=1, but no CUDA toolkit found"):
        setup_py._extension()
