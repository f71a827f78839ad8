"""Instruction counts of one C++ CPU kernel call: `python -m benchmarks.callgrind`, a noise-free before/after.

Wall-clock times on a shared machine move by tens of percent; the number of instructions one call
executes does not. This runs a child Python under ``valgrind --tool=callgrind``, collecting only
inside the op named (``--toggle-collect``), calls it once on one thread, and prints the count:

    python -m benchmarks.callgrind --op bwd --dtype fp32 --seqlen 512 --head-dim 64 --causal
    git stash; make install; python -m benchmarks.callgrind ...; git stash pop; make install; ...

Instructions are not time (a cache miss or a dependency chain costs cycles, not instructions), but a
change that removes work shows up here exactly, whatever else the machine is doing. Valgrind runs
AVX2 code but not AVX-512: the count is of the kernel version the CPU (as valgrind emulates it) picks.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

from .cli import parser

# The C++ entry points of torch.ops.fused_attention.fwd / .bwd on a CPU (csrc/cpu/attention_cpu.cpp).
OP_SYMBOLS = {"fwd": "fused_attention::attention_forward_cpu*", "bwd": "fused_attention::attention_backward_cpu*"}

# What the child runs: inputs made and the forward done outside the counted symbol, then the op once.
CHILD = """
import sys, torch, attention
op, dtype, batch, heads, n, d, causal = sys.argv[1], getattr(torch, sys.argv[2]), *map(int, sys.argv[3:7]), sys.argv[7] == "1"
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
q, k, v, dout = (torch.randn(batch, heads, n, d, generator=gen).to(dtype) for _ in range(4))
# scale, key_padding_mask, cu_seqlens_q/k, max_seqlen_q/k, window (right bound 0: causal), softcap, alibi_slopes,
# dropout_p, dropout_seed, dropout_offset
options = (d ** -0.5, None, None, None, 0, 0, -1, 0 if causal else -1, 0.0, None, 0.0, 0, 0)
if op == "fwd":
    torch.ops.fused_attention.fwd(q, k, v, causal, *options)
else:
    o, lse = torch.ops.fused_attention.fwd(q, k, v, causal, *options)
    torch.ops.fused_attention.bwd(dout, q, k, v, o, lse, causal, *options)
"""

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    p = parser("python -m benchmarks.callgrind", __doc__)
    p.add_argument("--op", choices=tuple(OP_SYMBOLS), default="fwd", help="the kernel call to count")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="input dtype")
    p.add_argument("--batch", type=int, default=1, help="B")
    p.add_argument("--heads", type=int, default=1, help="H")
    p.add_argument("--seqlen", type=int, default=512, help="N, for queries and keys")
    p.add_argument("--head-dim", type=int, default=64, help="d")
    p.add_argument("--causal", action="store_true", help="with the causal mask (default: without)")
    p.add_argument("--keep", type=pathlib.Path, help="also keep callgrind's output file here (for callgrind_annotate)")
    args = p.parse_args(argv)
    for flag in ("batch", "heads", "seqlen", "head_dim"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if shutil.which("valgrind") is None:
        p.error("valgrind is not installed (apt-get install valgrind)")
    return args


def instruction_count(callgrind_out):
    """The total Ir of a callgrind output file (its "summary:" or "totals:" line)."""
    text = pathlib.Path(callgrind_out).read_text()
    match = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"{callgrind_out}: no summary line; did the op run?")
    return int(match.group(1))


def count(op, dtype, batch, heads, seqlen, head_dim, causal, keep=None):
    """Instructions executed inside one call of ``op``, run in a child process under callgrind."""
    with tempfile.TemporaryDirectory() as folder:
        out_file = pathlib.Path(folder) / "callgrind.out"
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
            f"--toggle-collect={OP_SYMBOLS[op]}", sys.executable, "-c", CHILD, op, DTYPES[dtype],
            *map(str, (batch, heads, seqlen, head_dim)), "1" if causal else "0",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"valgrind failed ({done.returncode}):\n{done.stderr[-2000:]}")
        if keep is not None:
            shutil.copy(out_file, keep)
        return instruction_count(out_file)


def main(argv=None):
    args = parse_args(argv)
    try:
        instructions = count(args.op, args.dtype, args.batch, args.heads, args.seqlen, args.head_dim, args.causal,
                             args.keep)
    except (RuntimeError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    shape = (f"{args.op} {args.dtype} B={args.batch} H={args.heads} N={args.seqlen} d={args.head_dim} "
             f"{'causal' if args.causal else 'non-causal'}, 1 thread")
    print(f"{shape}: {instructions:,} instructions")
    if args.keep:
        print(f"wrote {args.keep.resolve()}")


if __name__ == "__main__":
    main()
