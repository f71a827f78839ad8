"""The CUDA kernels, checked with the toolkit alone (no GPU, no torch).

Every translation unit of csrc/cuda compiles with nvcc for the GPUs setup.py builds for, and
ptxas's resource report (-Xptxas -v) of every kernel instantiation holds two gates:
- no local memory: 0 bytes of spill stores, spill loads and stack frame, but for the one kernel of
  KNOWN_LOCAL_MEMORY, held to what it uses now;
- registers and shared memory equal csrc/cuda/RESOURCES.md, so that a change shows in review.
After a deliberate change, regenerate the table with

    python tests/test_cuda_compile.py --update

Each .cu is compiled once per architecture in a test session. Numerics are covered elsewhere (the
emulator, and test_attention.py on a GPU).
"""
import argparse
import difflib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CUDA_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
TABLE = CUDA_DIR / "RESOURCES.md"
NVCC = shutil.which("nvcc")
if NVCC is None and os.environ.get("CI", "").lower() in ("true", "1"):
    raise RuntimeError("CI expects nvcc on PATH: the CUDA kernels' compile and resource gates need it")

# The binaries setup.py builds by default (sm_80 and sm_90, plus PTX), with the nvcc flags setup.py and
# torch's BuildExtension pass, so that the table describes what users run.
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90": "arch=compute_90,code=sm_90"}
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++20", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

# Readable names of the kernels, in table order, and the tiles.h struct that sizes each one's
# dynamic shared memory (None: the kernel is launched without any).
KERNELS = {
    "attention_forward_kernel": ("forward", "ForwardTiles"),
    "attention_backward_delta_kernel": ("backward delta", None),
    "attention_backward_dk_dv_kernel": ("backward dK dV", "KeyTileTiles"),
    "attention_backward_dq_kernel": ("backward dQ", "QueryTileTiles"),
    "attention_decode_kernel": ("decode", "DecodeTiles"),
}
DTYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16"}
# The kernels' kPaddedOrPacked (compiled with or without key padding and packed sequences) and
# kScoreModifiers (with or without window, softcap, ALiBi and dropout); None: not compiled per case.
OPTIONS = {"0": "no", "1": "yes", None: "either"}
# e.g. ..._24attention_forward_kernelI6__halfLi128ELb1ELb0EEEvNS_15AttentionParamsEb:
# kernel<__half, 128, true, false>
MANGLED_KERNEL = re.compile(
    r"(attention_[a-z_]+_kernel)I(6__half|13__nv_bfloat16)(?:Li(\d+)E)?(?:Lb([01])E)?(?:Lb([01])E)?E")


class Resources(NamedTuple):
    kernel: str
    dtype: str
    head_dim: int  # 0: the kernel does not depend on it
    padded_or_packed: str  # "yes", "no", or "either" for a kernel not compiled per case
    score_modifiers: str  # the same
    arch: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    static_smem_bytes: int
    dynamic_smem_bytes: int


# (kernel, head dim, score modifiers, arch) -> bytes of stack frame allowed. The forward with score modifiers
# at head dim 256 on sm_90 needs every one of its 255 registers and spills 4 bytes (an 8-byte frame);
# trimming the modifiers' per-score state there is open work.
KNOWN_LOCAL_MEMORY = {("forward", 256, "yes", "sm_90"): 8}

COLUMNS = ["kernel", "dtype", "head dim", "padding or varlen", "score modifiers", "arch", "registers", "stack (B)",
           "spill stores (B)", "spill loads (B)", "static smem (B)", "dynamic smem (B)"]


def nvcc_version():
    return subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


def compile_source(source, arch, out_dir):
    """nvcc -c with ptxas's resource report; returns (command, returncode, compiler output)."""
    command = [NVCC, "-c", str(source), "-o", str(pathlib.Path(out_dir) / f"{source.stem}.{arch}.o"),
               "-gencode", ARCHS[arch], *NVCC_FLAGS, "-Xptxas", "-v"]
    result = subprocess.run(command, capture_output=True, text=True)
    return " ".join(command), result.returncode, result.stdout + result.stderr


def dynamic_shared_memory(out_dir):
    """{(tiles struct, head dim): kSmemBytes}, printed by a host program built on tiles.h."""
    head_dims = (64, 128, 256)
    structs = [tiles for _, tiles in KERNELS.values() if tiles]
    lines = [f'std::printf("{s} {d} %zu\\n", fused_attention::{s}<{d}>::kSmemBytes);' for s in structs for d in head_dims]
    program = pathlib.Path(out_dir) / "smem.cpp"
    program.write_text('#include <cstdio>\n#include "tiles.h"\nint main() {\n  ' + "\n  ".join(lines) + "\n}\n")
    binary = pathlib.Path(out_dir) / "smem"
    subprocess.run([NVCC, "-x", "c++", "-std=c++17", "-I", str(CUDA_DIR), str(program), "-o", str(binary)], check=True)
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    return {(s, int(d)): int(b) for s, d, b in (line.split() for line in out.splitlines())}


def parse_ptxas(output, smem_bytes):
    """One Resources per kernel in ptxas -v output (nvcc 13: 'Compiling entry function', then
    'bytes stack frame, ... spill loads' and 'Used N registers, ... [M bytes smem]')."""
    rows = []
    for block in re.split(r"Compiling entry function '", output)[1:]:
        mangled, arch = re.match(r"(\S+)' for '(\w+)'", block).groups()
        match = MANGLED_KERNEL.search(mangled)
        assert match, f"a kernel this test cannot name: {mangled}"
        name, dtype, head_dim, padded_or_packed, score_modifiers = match.groups()
        kernel, tiles = KERNELS[name]
        head_dim = int(head_dim or 0)
        stack, stores, loads = map(int, re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block).groups())
        registers = int(re.search(r"Used (\d+) registers", block).group(1))
        static_smem = re.search(r"(\d+) bytes smem", block)
        rows.append(Resources(kernel, DTYPES[dtype], head_dim, OPTIONS[padded_or_packed], OPTIONS[score_modifiers], arch,
                              registers, stack, stores, loads,
                              int(static_smem.group(1)) if static_smem else 0,
                              smem_bytes[tiles, head_dim] if tiles else 0))
    return rows


def table_text(rows, version):
    order = {kernel: i for i, (kernel, _) in enumerate(KERNELS.values())}
    rows = sorted(rows, key=lambda r: (order[r.kernel], r.dtype != "fp16", r.head_dim, r.padded_or_packed,
                                       r.score_modifiers, r.arch))
    lines = [
        "# Resources of the CUDA kernels",
        "",
        "What ptxas reports for every kernel instantiation, plus each kernel's dynamic shared memory",
        "(its `kSmemBytes` in tiles.h, at most 99 KB = 101376 B). Generated with `" + version + "`",
        "and setup.py's flags by `python tests/test_cuda_compile.py --update`; that test fails when",
        "this table is out of date, and when any kernel uses local memory (stack frame, spills) beyond",
        "its KNOWN_LOCAL_MEMORY (one: the forward with score modifiers at head dim 256 on sm_90, 8 B).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        values = row._replace(head_dim=row.head_dim or "all")  # the delta kernel serves every head dim
        lines.append("| " + " | ".join(map(str, values)) + " |")
    return "\n".join(lines) + "\n"


def table_version(text):
    match = re.search(r"Generated with `([^`]+)`", text)
    return match.group(1) if match else None


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """compiled(source, arch) -> (command, returncode, output), each compiled once a session."""
    cache = {}

    def get(source, arch):
        if (source, arch) not in cache:
            cache[source, arch] = compile_source(source, arch, tmp_path_factory.mktemp("nvcc"))
        return cache[source, arch]

    return get


@pytest.fixture(scope="session")
def smem_bytes(tmp_path_factory):
    return dynamic_shared_memory(tmp_path_factory.mktemp("smem"))


def test_kernel_sources_found():
    assert {p.name for p in CUDA_SOURCES} >= {"flash_fwd.cu", "flash_bwd.cu"}


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


@needs_nvcc
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_compiles_without_local_memory(source, arch, compiled, smem_bytes):
    command, returncode, output = compiled(source, arch)
    assert returncode == 0, f"{command}\n{output}"
    rows = parse_ptxas(output, smem_bytes)
    assert rows, f"ptxas reported no kernel:\n{output}"
    allowed = lambda r: KNOWN_LOCAL_MEMORY.get((r.kernel, r.head_dim, r.score_modifiers, r.arch), 0)
    local = [r for r in rows if max(r.stack_bytes, r.spill_store_bytes, r.spill_load_bytes) > allowed(r)]
    assert not local, "kernels using local memory (stack frame / spills), see csrc/cuda/tiles.h:\n" + "\n".join(
        map(str, local))


@needs_nvcc
def test_resource_table_is_current(compiled, smem_bytes):
    expected = TABLE.read_text() if TABLE.exists() else ""
    version = nvcc_version()
    if TABLE.exists() and table_version(expected) != version:
        pytest.skip(f"{TABLE.name} was made with `{table_version(expected)}`, this nvcc is `{version}`")
    rows = []
    for source in CUDA_SOURCES:
        for arch in ARCHS:
            _, returncode, output = compiled(source, arch)
            if returncode != 0:
                pytest.fail(f"{source.name} does not compile for {arch}")
            rows += parse_ptxas(output, smem_bytes)
    actual = table_text(rows, version)
    if actual != expected:
        name = str(TABLE.relative_to(ROOT))
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), name, "ptxas -v"))
        pytest.fail(f"{name} is out of date; review the change below, then regenerate it with "
                    f"`python tests/test_cuda_compile.py --update`:\n{diff}", pytrace=False)


def main():
    parser = argparse.ArgumentParser(description="Print (or --update) csrc/cuda/RESOURCES.md from ptxas -v.")
    parser.add_argument("--update", action="store_true", help=f"write {TABLE.relative_to(ROOT)}")
    args = parser.parse_args()
    if NVCC is None:
        sys.exit("nvcc is not on PATH")
    with tempfile.TemporaryDirectory() as out_dir:
        smem = dynamic_shared_memory(out_dir)
        rows = []
        for source in CUDA_SOURCES:
            for arch in ARCHS:
                command, returncode, output = compile_source(source, arch, out_dir)
                if returncode != 0:
                    sys.exit(f"{command}\n{output}")
                rows += parse_ptxas(output, smem)
    text = table_text(rows, nvcc_version())
    if args.update:
        TABLE.write_text(text)
        print(f"wrote {TABLE.relative_to(ROOT)}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
