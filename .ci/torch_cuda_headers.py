"""Check setup.py's TORCH_CUDA_HEADERS against the headers the compiler really opens for binding.cpp.

setup.py builds the CUDA kernels only when every header that torch's CUDA headers pull in from
outside torch is found, so that a missing one means "CPU kernels, with a reason" rather than a
failed install. This lists those headers with `c++ -H` (run with a CUDA build of torch installed)
and fails when torch includes one that setup.py does not look for.
Usage: python .ci/torch_cuda_headers.py
"""
import ast
import os
import pathlib
import re
import subprocess
import sys
import sysconfig

from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[1]
BINDING = ROOT / "csrc" / "cuda" / "binding.cpp"


def listed_headers():
    """TORCH_CUDA_HEADERS, read from setup.py's source (importing setup.py would run setup())."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "TORCH_CUDA_HEADERS":
            return set(ast.literal_eval(node.value))
    sys.exit("setup.py defines no TORCH_CUDA_HEADERS")


def opened_headers():
    """Headers of the CUDA toolkit or the nvidia-* wheels that a header of torch includes, by name."""
    torch_include = os.path.realpath(cpp_extension.include_paths()[0])
    includes = [f"-I{d}" for d in cpp_extension.include_paths(device_type="cuda")]
    # Where the nvidia-* wheels keep the library headers (site-packages/nvidia/*/include).
    wheel_dirs = [str(p) for p in pathlib.Path(torch_include).parents[1].glob("nvidia/*/include")]
    cuda_dirs = tuple(os.path.realpath(d) + os.sep for d in [f"{cpp_extension.CUDA_HOME}/include", *wheel_dirs])
    command = ["c++", "-std=c++20", "-fsyntax-only", "-H", "-DFUSED_ATTENTION_CUDA_TARGETS=sm_80",
               *includes, f"-I{sysconfig.get_paths()['include']}",
               *[arg for d in wheel_dirs for arg in ("-idirafter", d)], str(BINDING)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)}\n{result.stderr[-3000:]}")
    stack, found = [], set()
    for line in result.stderr.splitlines():  # -H prints one line per header: dots for the depth, path
        match = re.match(r"(\.+) (.+)", line)
        if not match:
            continue
        depth, path = len(match.group(1)), os.path.realpath(match.group(2))
        stack[depth - 1:] = [path]
        includer = stack[depth - 2] if depth > 1 else str(BINDING)
        if includer.startswith(torch_include) and path.startswith(cuda_dirs):
            found.add(os.path.basename(path))
    return found


if __name__ == "__main__":
    opened, listed = opened_headers(), listed_headers()
    print(f"headers torch's CUDA headers include from outside torch: {', '.join(sorted(opened))}")
    if not opened:
        sys.exit("found none: the -H parsing is broken")
    if opened - listed:
        sys.exit(f"setup.py's TORCH_CUDA_HEADERS lacks {', '.join(sorted(opened - listed))}")
