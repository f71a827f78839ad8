"""Why the cuda backend cannot run on a given GPU, checked without one: the pure functions
attention/backends.py feeds with the device's properties and the extension's build facts."""
import types

import pytest
import torch

from attention import backends, ops
from attention.backends import cuda_device_problems, cuda_image_problem
from attention.validation import AttentionOptions

DEFAULT_TARGETS = "sm_80,compute_90,sm_90"  # what setup.py builds by default: "8.0;9.0+PTX"
KIB = 1024
OPTIONS = AttentionOptions(causal=False, softmax_scale=0.0625)


@pytest.mark.parametrize(
    "capability,targets",
    [
        ((8, 0), DEFAULT_TARGETS),
        ((8, 6), DEFAULT_TARGETS),  # RTX 30xx, A10: the sm_80 binary
        ((8, 9), DEFAULT_TARGETS),  # L4, L40, RTX 40xx
        ((9, 0), DEFAULT_TARGETS),
        ((10, 0), DEFAULT_TARGETS),  # B200: JIT from the compute_90 PTX
        ((12, 0), DEFAULT_TARGETS),  # RTX 50xx: the same
        ((9, 0), "sm_90a"),
        ((8, 6), "compute_80"),
        ((10, 3), "sm_100f"),
    ],
)
def test_kernel_image_found(capability, targets):
    assert cuda_image_problem(capability, targets) is None


@pytest.mark.parametrize(
    "capability,targets",
    [
        ((10, 0), "sm_80,sm_90"),  # no PTX: nothing a newer GPU can run
        ((12, 0), "sm_80,sm_90"),
        ((8, 0), "sm_86"),  # a binary runs on its own minor version and newer ones only
        ((8, 0), "compute_90"),  # PTX runs on its version and newer only
        ((10, 0), "sm_90a,compute_90a"),  # arch-specific code runs on 9.0 only
    ],
)
def test_no_kernel_image(capability, targets):
    problem = cuda_image_problem(capability, targets)
    version = f"{capability[0]}.{capability[1]}"
    assert problem == (f"attention._C has no kernel image for compute capability {version} (built for {targets}): "
                       f"reinstall with TORCH_CUDA_ARCH_LIST={version}")


def test_capability_below_8_is_the_only_reason_given():
    problems = cuda_device_problems((7, 5), 64 * KIB, DEFAULT_TARGETS, {"forward": 200 * KIB})
    assert problems == ["the CUDA kernels need compute capability 8.0 or newer, this GPU has 7.5"]


def test_shared_memory_above_the_device_limit():
    # A kernel needing more than the 99 KiB sm_86/sm_89 let a block opt in to (ours fit: tiles.h).
    needed = {"forward": 65536, "backward": 131584}
    assert cuda_device_problems((8, 6), 99 * KIB, DEFAULT_TARGETS, needed) == [
        f"the backward kernels need 131584 bytes of shared memory per block, above this GPU's {99 * KIB}"
    ]
    assert cuda_device_problems((8, 6), 99 * KIB, DEFAULT_TARGETS, {"forward": 65536}) == []
    assert cuda_device_problems((9, 0), 227 * KIB, DEFAULT_TARGETS, needed) == []


def test_every_problem_is_reported():
    problems = cuda_device_problems((12, 0), 99 * KIB, "sm_80,sm_90", {"forward": 100 * KIB, "backward": 128 * KIB})
    assert len(problems) == 3
    assert "no kernel image" in problems[0]
    assert problems[1].startswith("the forward kernels need 102400 bytes")
    assert problems[2].startswith("the backward kernels need 131072 bytes")


def test_cuda_backend_reads_the_device_and_the_extension(monkeypatch):
    """_cuda_why_not's wiring, with a fake RTX 3090 (8.6, 99 KiB), a kernel too big for it and stand-ins for CUDA tensors."""
    monkeypatch.setattr(ops, "EXTENSION_ERROR", None)
    monkeypatch.setattr(ops, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(ops, "CUDA_TARGETS", DEFAULT_TARGETS)
    monkeypatch.setattr(ops, "CUDA_SHARED_MEMORY_BYTES", {(256, False): 65536, (256, True): 131584})
    device = types.SimpleNamespace(major=8, minor=6, shared_memory_per_block_optin=99 * KIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: device)

    def tensor(requires_grad):
        return types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=(1, 1, 8, 256),
                                     requires_grad=requires_grad, numel=lambda: 2048)

    assert backends._cuda_why_not(*[tensor(False)] * 3, OPTIONS) == []
    reasons = backends._cuda_why_not(*[tensor(True)] * 3, OPTIONS)
    assert reasons == [f"the backward kernels need 131584 bytes of shared memory per block, above this GPU's {99 * KIB}"]
    with torch.no_grad():
        assert backends._cuda_why_not(*[tensor(True)] * 3, OPTIONS) == []
    device.major, device.minor = 7, 5
    assert backends._cuda_why_not(*[tensor(False)] * 3, OPTIONS) == [
        "the CUDA kernels need compute capability 8.0 or newer, this GPU has 7.5"
    ]
