"""The Triton compile gate: what every kept config compiles to on sm_80 and sm_90, checked without a GPU.

Each kernel is compiled, at head dims 64, 128 and 256 (those it runs at: the dK/dV kernel with dQ fused in,
deterministic=False, stops at 128; above 128 the dK/dV kernel runs as two passes, dk_pass and dv_pass), with
every fp16/bf16 config it keeps for that head dim, its key-padding and varlen variants (the decode kernel: its
paged-cache variant), and its score-option variants (sliding window, softcap with ALiBi, dropout) on sm_90,
these at head dim 128 (the two passes: 256) (triton_kernels/resources.py, VARIANTS; it also writes the
committed table triton_kernels/RESOURCES.md):
- no register spills, on either architecture, in any kernel at any head dim;
- sm_90: every tl.dot a warp-group MMA (wgmma), no mma.sync fallback, but in the decode kernel's 16-row tiles
  (a warp group's wgmma takes 64 rows): mma.sync there;
- the training kernels' TMA variant (what sm_90+ runs where TMA can address the tiles, at every head dim): its
  loads are TMA (cp.async.bulk.tensor), and so are the fused dQ's adds (cp.reduce.async.bulk.tensor) but in
  varlen;
- sm_80: mma.sync, with cp.async loads;
- no transposes of matmul results (a round trip through shared memory each);
- the shared memory the autotuner's pruner estimates is what the build uses (wgmma builds, within 8 KiB), or
  more (mma.sync builds, which keep one pipeline stage fewer in shared memory; TMA builds, whose estimate
  adds KernelConfigs.tma_shared_memory: their barriers, and the fused dQ's staged tile); sm_80 builds' estimate
  adds KernelConfigs.mma_sync_shared_memory (the fused dQ's copy of K).
A failing case is named by kernel, variant, architecture, head dim and config. Each compile runs ptxas (a few
seconds); select the gate alone with `pytest -m compile_gate`.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from attention.triton_kernels import resources  # noqa: E402

pytestmark = pytest.mark.compile_gate

CONFIGS = {name: configs for name, (_, configs) in resources.KERNELS.items()}
# The smallest tile a warp group's wgmma takes has 64 rows.
WGMMA_MIN_ROWS = 64
HEAD_DIMS = (64, 128, 256)


def _shape(config):
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"


CASES = [
    pytest.param(
        name, variant, arch, head_dim, config,
        id=f"{name}-{variant}-sm{arch}-d{head_dim}-{_shape(config).replace(' ', '-')}",
    )
    for name, config, arch, head_dim, variant in resources.all_jobs()
]


@pytest.fixture(scope="module")
def compiled_list(tmp_path_factory):
    """Every case compiled once, in a subprocess: under TRITON_INTERPRET=1 (set for the other tests) the
    kernels in this process are the interpreter's and cannot be compiled."""
    out = tmp_path_factory.mktemp("triton_compile") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "attention.triton_kernels.resources", "--json", str(out), "--processes", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def compiled(compiled_list):
    results = {}
    for entry in compiled_list:
        if isinstance(entry, dict):
            key = (entry["kernel"], entry["variant"], entry["arch"], entry["head_dim"],
                   f"{entry['block_m']}x{entry['block_n']} w{entry['num_warps']} s{entry['num_stages']}")
            results[key] = entry
        else:  # [kernel, config, arch, head_dim, variant, error]
            results[(entry[0], entry[4], entry[2], entry[3], entry[1])] = entry[5]
    return results


@pytest.mark.parametrize("name, variant, arch, head_dim, config", CASES)
def test_kept_config_compiles_clean(compiled, name, variant, arch, head_dim, config):
    case = f"{name} {variant} sm_{arch} d{head_dim} {_shape(config)}"
    r = compiled[(name, variant, arch, head_dim, _shape(config))]
    assert isinstance(r, dict), f"{case}: does not compile: {r}"
    assert r["spill_bytes"] == 0, f"{case}: spills {r['spill_bytes']} bytes ({r['registers']} registers)"
    assert r["result_transposes"] == 0, f"{case}: {r['result_transposes']} transposes of matmul results (tt.trans)"
    wgmma = arch == 90 and (name != "decode" or config.kwargs["BLOCK_M"] >= WGMMA_MIN_ROWS)
    if wgmma:
        assert r["wgmma_dots"] == r["dots"], f"{case}: only {r['wgmma_dots']} of {r['dots']} dots are wgmma"
        assert not r["mma_sync"], f"{case}: mma.sync in the PTX"
    else:
        assert r["mma_sync"], f"{case}: no mma.sync in the PTX"
        assert r["cp_async"], f"{case}: no cp.async in the PTX"
    tma = resources.VARIANTS[variant].get("TMA", False)
    if tma:
        assert r["tma"], f"{case}: no TMA (cp.async.bulk.tensor) in the PTX"
    # The fused dQ's adds: a TMA reduction where its tiles start 16-byte aligned (not varlen's), else atomics.
    if name == "dkdv_fused":
        expected = variant == "tma"
        assert r["tma_reduce"] == expected, f"{case}: TMA reduction {'missing' if expected else 'unexpected'}"
    estimate = CONFIGS[name].shared_memory(config, head_dim, 2)
    if tma:  # the pruner adds these to its estimate
        estimate += CONFIGS[name].tma_shared_memory(config, head_dim)
    if arch < 90:
        estimate += CONFIGS[name].mma_sync_shared_memory(config, head_dim, 2)
    # mma.sync and TMA builds use less shared memory than wgmma builds with cp.async: there the estimate need
    # only be an upper bound, so that it never keeps a config that does not fit.
    fits = abs(estimate - r["shared_bytes"]) <= 8192 if wgmma and not tma else estimate >= r["shared_bytes"]
    assert fits, f"{case}: shared memory estimated {estimate} bytes, compiled {r['shared_bytes']}"


@pytest.mark.parametrize("arch, limit", [(80, 166912), (90, 232448)], ids=["A100", "H100"])
@pytest.mark.parametrize(
    "name, head_dim", [(name, d) for name in CONFIGS for d in HEAD_DIMS if resources.launched(name, d)]
)
def test_some_config_fits_shared_memory(compiled, name, head_dim, arch, limit):
    """The pruner falls back to the smallest config when none fits, so at least one must (A100: 163 KiB,
    H100: 227 KiB of shared memory per block)."""
    sizes = [compiled[(name, "plain", arch, head_dim, _shape(c))] for c in CONFIGS[name].for_head_dim(head_dim, arch)]
    assert any(isinstance(r, dict) and r["shared_bytes"] <= limit for r in sizes), (
        f"{name} sm_{arch} d{head_dim}: no kept config fits {limit} bytes of shared memory"
    )


def test_committed_table_is_current(compiled_list):
    """triton_kernels/RESOURCES.md is what the kept configs compile to now (regenerate it with the command
    in its header when a kernel or a config list changes)."""
    rows = [resources.Resources(**e) if isinstance(e, dict) else tuple(e) for e in compiled_list]
    committed = (pathlib.Path(__file__).resolve().parents[1] / "triton_kernels" / "RESOURCES.md").read_text()
    assert resources.format_table(rows) in committed, "triton_kernels/RESOURCES.md is out of date"
