import os

import pytest
import torch

# Without a GPU, Triton kernels run on the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPU = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="run the whole shape grid (meant for a GPU)")


def backend_problem(name, device):
    """Why backend `name` cannot run a small float16 call on `device`, or None."""
    import attention

    probe = torch.zeros(1, 1, 1, 16, dtype=torch.float16, device=device)
    reasons = attention.explain(probe, probe, probe, backend=name).passed_over.get(name)
    return "; ".join(reasons) if reasons else None


# What a CI run must have: (what, a check that says why it is missing, or None). Without it, the tests
# of a missing backend skip (test_cpu_backend.py's importorskip) or never reach it, and the run stays
# green while testing less. Append a check here for anything new the suite must not silently lose.
REQUIRED_IN_CI = [
    ("the C++ CPU kernels (attention._C)", lambda: backend_problem("cpu", "cpu")),
    ("the Triton kernels" + ("" if GPU else " on Triton's interpreter"),
     lambda: backend_problem("triton", "cuda" if GPU else "cpu")),
]
if GPU:
    REQUIRED_IN_CI.append(("the CUDA C++ kernels", lambda: backend_problem("cuda", "cuda")))
else:
    REQUIRED_IN_CI.append(("the CUDA kernels on the emulator (make emulator)",
                           lambda: __import__("cuda_emulator").UNAVAILABLE))


def missing_in_ci():
    """'what: why' for each entry of REQUIRED_IN_CI that is missing here."""
    return [f"{what}: {why}" for what, check in REQUIRED_IN_CI if (why := check()) is not None]


def pytest_sessionstart():
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        return
    missing = missing_in_ci()
    if missing:
        pytest.exit("CI is set, so every backend must be tested, but these are missing:\n  - "
                    + "\n  - ".join(missing), returncode=1)
