"""What the Triton kernels compile to on sm_80 and sm_90, found without a GPU.

``triton.compile`` runs on any machine for a ``GPUTarget``; Triton's bundled ``ptxas -v`` reports the
registers and spills. For each autotune config of each kernel this gives registers, spill bytes, shared
memory, and which instructions carry the matmuls and the loads (wgmma or mma.sync; cp.async, TMA), plus
the transposes (``tt.trans`` in TTGIR), those of matmul results costing a round trip through shared memory.

    python -m attention.triton_kernels.resources --write triton_kernels/RESOURCES.md   # the committed table
    python -m attention.triton_kernels.resources --json FILE     # the same as JSON (the compile gate reads it)

Each kernel is compiled at head dims 64, 128 and 256 (those it runs at: `launched`) with the configs it keeps
for that head dim (KernelConfigs.for_head_dim), and its option variants at one head dim (VARIANTS,
VARIANT_KERNELS, `compiled_head_dims`). The compile gate (tests/test_triton_compile.py) checks the results;
the config lists were chosen from this table. Must run without TRITON_INTERPRET=1 (under it, the kernels are
the interpreter's and cannot be compiled).
"""
import argparse
import contextlib
import dataclasses
import io
import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import backward, decode, forward

ARCHS = (80, 90)
HEAD_DIMS = (64, 128, 256)  # the two common ones and the largest supported
# The constexpr variants of the kernels: "plain" (no key padding, not varlen: what a call without options
# runs), compiled at every head dim, and one variant per option, compiled at one head dim (128, the largest at
# which the dK/dV kernel computes dK and dV in one pass; 256 for its two passes) to hold the option's own code
# (the padding mask's loads and tile skipping; varlen's sequence bounds; the window's third, masked loop;
# softcap's tanh and ALiBi's bias, together; dropout's Philox) to the same checks without doubling the gate's
# time. The score options (window, softcap and ALiBi, dropout) only on sm_90, the architecture they are tuned
# for. Grouped-query heads are a runtime argument, in every variant.
VARIANTS = {
    "plain": {}, "padded": {"PADDED": True}, "varlen": {"VARLEN": True},
    "paged": {"PAGED": True},  # decode from a paged KV cache: its per-key-row block gather
    "window": {"WINDOW": True, "CAUSAL": False},  # a causal window runs the WINDOW code with CAUSAL off
    "softcap_alibi": {"SOFTCAP": True, "ALIBI": True},
    "dropout": {"DROPOUT": True},
    "tma": {"TMA": True},  # the tiles through TMA descriptors, as sm_90+ runs them where TMA can address them
    "tma_varlen": {"TMA": True, "VARLEN": True},  # varlen on sm_90+: per-sequence descriptors; dQ's adds by pointer
}
OPTION_HEAD_DIMS = (128, 256)  # an option variant's head dim: the first of these at which the kernel runs
VARIANT_ARCHS = {
    variant: ARCHS if variant in ("plain", "padded", "varlen", "paged") else (90,) for variant in VARIANTS
}
# The kernels that have each variant: the decode kernel has no key padding, varlen or dropout, only it
# reads a paged cache.
TRAINING_KERNELS = ("forward", "dkdv", "dk_pass", "dv_pass", "dkdv_fused", "dq")
VARIANT_KERNELS = {
    "plain": (*TRAINING_KERNELS, "decode"), "padded": TRAINING_KERNELS, "varlen": TRAINING_KERNELS,
    "paged": ("decode",), "window": (*TRAINING_KERNELS, "decode"), "softcap_alibi": (*TRAINING_KERNELS, "decode"),
    "dropout": TRAINING_KERNELS,
    "tma": TRAINING_KERNELS, "tma_varlen": TRAINING_KERNELS,
}
# Constexprs a kernel entry compiles with beyond its variant's: the dK/dV kernel's passes (launched where
# backward.dkdv_passes runs them) and its fused dQ.
KERNEL_CONSTEXPRS = {
    "dkdv": {"WITH_DK": True, "WITH_DV": True},
    "dk_pass": {"WITH_DK": True, "WITH_DV": False},
    "dv_pass": {"WITH_DK": False, "WITH_DV": True},
    "dkdv_fused": {"WITH_DK": True, "WITH_DV": True, "FUSED_DQ": True},
}
DTYPE = "bf16"  # fp16 compiles to the same instructions and resources

# (kernel, its KernelConfigs) for every autotuned kernel. Only the fp16/bf16 configs are compiled: the fp32
# ones run "ieee" dots on CUDA cores, the accuracy path, with no tensor-core instructions to check.
KERNELS = {
    "forward": (forward._forward_kernel, forward.CONFIGS),
    "dkdv": (backward._dkdv_kernel, backward.DKDV_CONFIGS),
    "dk_pass": (backward._dkdv_kernel, backward.DKDV_CONFIGS),  # above head dim 128, dK's pass of the same kernel
    "dv_pass": (backward._dkdv_kernel, backward.DV_PASS_CONFIGS),  # and dV's
    "dkdv_fused": (backward._dkdv_kernel, backward.FUSED_DKDV_CONFIGS),  # deterministic=False: dQ fused in
    "dq": (backward._dq_kernel, backward.DQ_CONFIGS),
    "decode": (decode._decode_kernel, decode.CONFIGS),
}

# Row statistics and decode's partial outputs are float32, the key padding mask bool, its key bounds,
# cu_seqlens, the cache lengths and block table int32; every other tensor argument has the input dtype.
POINTER_TYPES = {
    "LSE": "*fp32", "DELTA": "*fp32", "DQ_ACCUM": "*fp32", "KEY_MASK": "*i1", "KEY_BOUNDS": "*i32",
    "CU_SEQLENS_Q": "*i32", "CU_SEQLENS_K": "*i32", "ALIBI_SLOPES": "*fp32", "O_PARTS": "*fp32",
    "LSE_PARTS": "*fp32", "SEQLENS_K": "*i32", "BLOCK_TABLE": "*i32",
}


@dataclasses.dataclass(frozen=True)
class Resources:
    kernel: str
    variant: str  # a key of VARIANTS
    arch: int
    head_dim: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # spill stores + spill loads, as ptxas -v reports them
    shared_bytes: int
    dots: int  # tl.dot ops in the kernel (TTIR)
    wgmma_dots: int  # of those, warp-group (wgmma) dots in TTGIR; the rest run as mma.sync
    mma_sync: bool
    cp_async: bool
    tma: bool  # TMA loads
    tma_reduce: bool  # TMA reductions (the fused dQ's adds)
    transposes: int  # tt.trans ops in TTGIR: of loaded tiles (a change of view) or of computed ones
    result_transposes: int  # of those, transposes of a matmul result (MMA layout): a trip through shared memory

    @property
    def config(self):
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


def _signature(fn):
    """Argument types as a real launch of contiguous bf16 tensors with 16-aligned strides specializes them."""
    signature, aligned = {}, []
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = POINTER_TYPES.get(name, f"*{DTYPE}")
            aligned.append(index)
        elif name.startswith("stride"):
            signature[name] = "i64" if param.annotation == "tl.int64" else "i32"
            aligned.append(index)
        elif param.annotation_type:  # e.g. the dropout seed, declared tl.int64
            signature[name] = param.annotation_type
        elif "scale" in name or name == "softcap_log2":
            signature[name] = "fp32"
        else:  # sizes: lengths, heads; any value, so no divisibility is assumed
            signature[name] = "i32"
    return signature, {(index,): [["tt.divisibility", 16]] for index in aligned}


def _constexprs(kernel_name, fn, config, head_dim, variant):
    values = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": head_dim,
        "CAUSAL": True,  # the causal kernel contains both the masked and the unmasked loop
        "PADDED": False,
        "VARLEN": False,
        "PAGED": False,
        "WINDOW": False,
        "SOFTCAP": False,
        "ALIBI": False,
        "DROPOUT": False,
        "DOT_PRECISION": "tf32",
        "FUSED_DQ": False,  # the default, deterministic backward
        "TMA": False,  # the pointer path, which every GPU runs where TMA cannot address the tiles
        **VARIANTS[variant],
        **KERNEL_CONSTEXPRS.get(kernel_name, {}),
        **config.kwargs,
    }
    return {p.name: values[p.name] for p in fn.params if p.is_constexpr}


def _ptxas_numbers(log):
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)) + int(spills.group(2))


def compile_config(kernel_name, config, arch, head_dim, variant="plain"):
    """Compile one config of one kernel's variant for sm_<arch> and read its resources and instructions."""
    kernel, _ = KERNELS[kernel_name]
    fn = kernel.fn
    signature, attrs = _signature(fn)
    constexprs = _constexprs(kernel_name, fn, config, head_dim, variant)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
    registers, spill_bytes = _ptxas_numbers(log.getvalue())
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    return Resources(
        kernel=kernel_name,
        variant=variant,
        arch=arch,
        head_dim=head_dim,
        block_m=config.kwargs["BLOCK_M"],
        block_n=config.kwargs["BLOCK_N"],
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        registers=registers,
        spill_bytes=spill_bytes,
        shared_bytes=compiled.metadata.shared,
        dots=len(re.findall(r"= tt\.dot ", compiled.asm["ttir"])),
        wgmma_dots=len(re.findall(r"= ttng\.warp_group_dot ", ttgir)),
        mma_sync="mma.sync.aligned" in ptx,
        cp_async="cp.async.cg" in ptx or "cp.async.ca" in ptx,
        tma="cp.async.bulk.tensor" in ptx,
        tma_reduce="cp.reduce.async.bulk.tensor" in ptx,
        transposes=len(re.findall(r"= tt\.trans ", ttgir)),
        result_transposes=len(re.findall(r"= tt\.trans %\S+ \{[^}]*\} : tensor<[^>]*#mma", ttgir)),
    )


def launched(name, head_dim):
    """Whether the kernel entry runs at this head dim: it has configs for it, and a dK/dV entry's pass is one
    that backward.dkdv_passes launches there."""
    constexprs = KERNEL_CONSTEXPRS.get(name, {})
    dkdv_pass = (constexprs.get("WITH_DK"), constexprs.get("WITH_DV"))
    if "WITH_DK" in constexprs and dkdv_pass not in backward.dkdv_passes(head_dim):
        return False
    return KERNELS[name][1].serves(head_dim)


def compiled_head_dims(name, variant):
    """The head dims a kernel entry's variant is compiled at: those it runs at for plain and tma, the first
    of OPTION_HEAD_DIMS it runs at for an option's variant."""
    if variant in ("plain", "tma"):
        return [d for d in HEAD_DIMS if launched(name, d)]
    return [d for d in OPTION_HEAD_DIMS if launched(name, d)][:1]


def all_jobs(kernels=None, variants=None):
    """(kernel, config, arch, head dim, variant) for each variant of each kernel at the variant's head dims
    and architectures where it runs, with every config the kernel keeps for that head dim and arch."""
    return [
        (name, config, arch, head_dim, variant)
        for variant in variants or VARIANTS
        for name in kernels or KERNELS
        if name in VARIANT_KERNELS[variant]
        for head_dim in compiled_head_dims(name, variant)
        for arch in VARIANT_ARCHS[variant]
        for config in KERNELS[name][1].for_head_dim(head_dim, arch)
    ]


def _compile_job(job):
    try:
        return compile_config(*job)
    except Exception as exc:  # noqa: BLE001 - reported in the table, and a failure of the compile gate
        name, config, arch, head_dim, variant = job
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (name, _shape(config), arch, head_dim, variant, message)


def _shape(config):
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"


def compile_all(jobs, processes=2):
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(_compile_job, jobs))


def format_table(results):
    lines = [
        "| kernel | variant | sm | d | config (M×N warps stages) | regs | spill B | smem KiB | dots: wgmma/total"
        " | mma.sync | cp.async | TMA | tt.trans: of results/all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if isinstance(r, tuple):
            name, shape, arch, head_dim, variant, message = r
            lines.append(
                f"| {name} | {variant} | {arch} | {head_dim} | {shape} | does not compile: {message[:60]} |||||||||"
            )
            continue
        lines.append(
            f"| {r.kernel} | {r.variant} | {r.arch} | {r.head_dim} | {r.config} | {r.registers} | {r.spill_bytes} | "
            f"{r.shared_bytes / 1024:.0f} | {r.wgmma_dots}/{r.dots} | {'yes' if r.mma_sync else 'no'} | "
            f"{'yes' if r.cp_async else 'no'} | {'yes' if r.tma else 'no'}{' + reduce' if r.tma_reduce else ''} | "
            f"{r.result_transposes}/{r.transposes} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="write the markdown table to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    results = compile_all(all_jobs(), args.processes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) if isinstance(r, Resources) else list(r) for r in results], f)
    table = format_table(results)
    header = (
        f"# Triton kernel resources (triton {triton.__version__}, {DTYPE}, causal)\n\n"
        "Written by `python -m attention.triton_kernels.resources --write triton_kernels/RESOURCES.md`.\n\n"
    )
    if args.write:
        with open(args.write, "w") as f:
            f.write(header + table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
