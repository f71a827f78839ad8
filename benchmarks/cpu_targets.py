"""Our C++ CPU kernels against torch's CPU SDPA, interleaved: `python -m benchmarks.cpu_targets`.

The grid of issue 15 (fp32/bf16, N 1K-4K, d 64/128, causal and not, 1 and 2 threads, B = 1) and its
targets: forward >= 1.5x torch, forward + backward >= 1.3x. Each case times ours and torch's
``scaled_dot_product_attention`` (its CPU flash kernel) in alternating rounds and reports, per mode,
the median wall-clock times with their spread, the ratio of the medians, the ratio of the CPU times
(the process's, all threads: what a busy machine's waiting for a core leaves out), our GFLOP/s and
its fraction of the machine's peak. Prints a markdown table (for benchmarks/NOTES.md) and writes
cpu_targets.json to --out.
"""
import itertools
import json
import pathlib
import sys

import torch

from .cases import DTYPES, Config
from .cli import comma, int_list, name_list, parser
from .providers import select_providers
from .report import write_json
from .run import _cpu_isa, busy_warning, cpu_peak, environment, measure_all, result_row

TARGETS = {"fwd": 1.5, "fwd+bwd": 1.3}

EXAMPLES = """examples:
  python -m benchmarks.cpu_targets                                  # the whole grid, B=1 H=2
  python -m benchmarks.cpu_targets --dtypes bf16 --seqlens 1024 --threads 1 --modes fwd

"""


def parse_args(argv=None):
    p = parser("python -m benchmarks.cpu_targets", __doc__, EXAMPLES)
    p.add_argument("--dtypes", type=name_list, default="fp32,bf16", help=f"comma list of {comma(DTYPES)}")
    p.add_argument("--seqlens", type=int_list, default="1024,2048,4096", help="comma list of N")
    p.add_argument("--head-dims", type=int_list, default="64,128", help="comma list of d")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--threads", type=int_list, default="1,2", help="comma list of thread counts")
    p.add_argument("--modes", type=name_list, default="fwd,fwd+bwd", help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2,
                   help="H; at least the thread count, since torch's CPU backward runs one thread per (batch, head)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per case (after one warm-up call)")
    p.add_argument("--out", type=pathlib.Path, help="folder for cpu_targets.json (default: none written)")
    args = p.parse_args(argv)
    for name in ("dtypes", "seqlens", "head_dims", "threads", "modes"):
        if isinstance(getattr(args, name), str):  # a default, unparsed
            setattr(args, name, (int_list if name in ("seqlens", "head_dims", "threads") else name_list)(getattr(args, name)))
    for dtype in args.dtypes:
        if dtype not in DTYPES:
            p.error(f"--dtypes: {dtype!r} is not one of {comma(DTYPES)}")
    for mode in args.modes:
        if mode not in ("fwd", "bwd", "fwd+bwd"):
            p.error(f"--modes: {mode!r} is not one of fwd,bwd,fwd+bwd")
    for flag, values in (("--seqlens", args.seqlens), ("--head-dims", args.head_dims), ("--threads", args.threads),
                         ("--batch", [args.batch]), ("--heads", [args.heads]), ("--repeats", [args.repeats])):
        if not values or min(values) < 1:
            p.error(f"{flag} must be positive, got {values}")
    return args


def run_grid(args, progress=sys.stderr):
    """Rows of ours and torch's measurements, two per (threads, dtype, causal, d, N, mode)."""
    ours, torch_sdpa = select_providers(["cpu", "sdpa-flash"])
    device = torch.device("cpu")
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        env = environment(device)
        for dtype, causal, d, n, mode in itertools.product(args.dtypes, causals, args.head_dims, args.seqlens, args.modes):
            config = Config(args.batch, args.heads, n, d, causal, dtype)
            pair = measure_all([ours, torch_sdpa], config, mode, device, cpu_min_time_s=0.0, min_rounds=args.repeats,
                               memory=False)
            case = [dict(result_row(p, config, mode, m, env), threads=threads) for p, m in zip((ours, torch_sdpa), pair)]
            rows += case
            if progress:
                print(format_line(*case), file=progress, flush=True)
    return rows


def _pct(fraction):
    return f"{100 * fraction:.0f}%"


def format_line(ours, torch_row):
    """One grid case as a markdown table row (or its failure)."""
    case = (f"| {ours['threads']} | {ours['dtype']} | {ours['seqlen']} | {ours['head_dim']} | "
            f"{'causal' if ours['causal'] else 'full'} | {ours['mode']} |")
    if ours["status"] != "ok" or torch_row["status"] != "ok":
        return f"{case} {ours['status']}: {ours['reason']} / torch {torch_row['status']}: {torch_row['reason']} |"
    ratio = torch_row["ms"] / ours["ms"]
    cpu_ratio = torch_row["cpu_ms"] / ours["cpu_ms"]
    gflops = ours["tflops"] * 1e3
    met = "yes" if min(ratio, cpu_ratio) >= TARGETS.get(ours["mode"], 0.0) else "no"
    return (f"{case} {ours['ms']:.1f} ±{_pct(ours['spread'] / 2)} | {torch_row['ms']:.1f} ±{_pct(torch_row['spread'] / 2)} | "
            f"{ratio:.2f} | {cpu_ratio:.2f} | {gflops:.1f} | {_pct(gflops / row_peak(ours))} | {met} |")


def row_peak(row):
    """The machine's peak for the row's dtype: bf16 products run at twice the fp32 rate on AVX512_BF16."""
    return row.get("peak_gflops_bf16", row["peak_gflops"]) if row["dtype"] == "bf16" else row["peak_gflops"]


HEADER = (
    "| threads | dtype | N | d | mask | mode | ours ms | torch ms | x torch (wall) | x torch (CPU time) | "
    "ours GFLOP/s | of peak | target met |\n|" + "---|" * 13
)


def main(argv=None):
    args = parse_args(argv)
    print(f"B={args.batch} H={args.heads}; ours = attention.flash_attention(backend='cpu'), torch = "
          f"scaled_dot_product_attention on CPU; {args.repeats} interleaved rounds per case; targets: "
          f"fwd >= {TARGETS['fwd']}x, fwd+bwd >= {TARGETS['fwd+bwd']}x (both ratios)")
    print(f"our tile products: {_cpu_isa()} (FUSED_ATTENTION_CPU_ISA picks a lower level)")
    for threads in args.threads:
        print(f"peak at {threads} thread(s): {cpu_peak(threads)[1]}")
    print("± is half the interquartile range of the rounds, relative to the median")
    print(HEADER, flush=True)
    rows = run_grid(args, progress=sys.stdout)
    warning = busy_warning(rows)
    if warning:
        print(f"\n{warning}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = (args.out / "cpu_targets.json").resolve()
        write_json(rows, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
