import os

import torch

# Without a GPU, Triton kernels run on the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="run the whole shape grid (meant for a GPU)")
