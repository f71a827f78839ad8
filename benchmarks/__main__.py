"""The main job: `python -m benchmarks` times every attention provider, prints a table, writes JSON and plots.

Default on a GPU: the FlashAttention paper's sweep (batch * N = 16K tokens, hidden 2048 so heads =
2048 / d, d in {64, 128}, N = 512 .. 16K, causal and not, fp16 and bf16, forward, backward and both),
then issue 10's cases: Llama-3-8B's grouped-query heads (32 query, 8 KV heads, d 128) and batches of
mixed lengths (packed for our varlen path, padded with a mask for the others), N = 1K .. 8K; then
issue 11's score options (the case set ``options``: a sliding window, softcap, ALiBi, dropout), ours
and naive given the option, SDPA the equivalent explicit mask or bias; then ``decode``, issue 13's
decoding from a KV cache (benchmarks/decode.py, its own table). Without a GPU: the CPU paths
at small sizes (it says so). ``--quick`` is a smoke run of seconds.
Each run writes to a folder of its own, benchmarks/runs/<device>-<UTC time>/ (or ``--out``); the
committed results in benchmarks/results/ change only when ``--out`` names them.
"""
import pathlib
import sys
from typing import NamedTuple

import torch

from . import decode
from .cases import CASE_SETS, CASES, DTYPES, OPTIONS, gqa_grid, option_grid, token_budget_grid, varlen_grid
from .cli import check_providers_and_modes, comma, int_list, name_list, parser
from .flops import MODES
from .providers import select_providers
from .report import default_out_dir, format_table, plot_results, write_json
from .run import busy_warning, device_slug, run_benchmarks


class Sizes(NamedTuple):
    """One case's defaults on one device. ``heads``: heads * d for grid and varlen (kept constant
    across d), (query heads, KV heads) for gqa."""

    seqlens: list
    head_dims: list
    dtypes: list
    tokens: int  # batch * N, kept constant across N
    heads: int | tuple
    modes: tuple = MODES
    causal: str = "both"
    window: int | None = None  # the window case's L: window (L, 0), or (L, L) without causal


# The score options, each a case of its own with the same sizes: decoder-like (causal), fwd and fwd+bwd.
# On a CPU one size, B = 1, 4 heads, small enough that the four add under a minute and a half to the
# main job on the 2-core machine (25 s quiet, 80 s at load 90); the window (256, 0) hides 56% of the
# causal triangle at N 1K (230,272 of 524,800 pairs left).
OPTION_SIZES = {
    ("cuda", False): Sizes([1024, 2048, 4096, 8192], [128], ["bf16"], 16384, 2048, ("fwd", "fwd+bwd"), "yes", 256),
    ("cuda", True): Sizes([1024], [128], ["fp16"], 4096, 2048, ("fwd", "fwd+bwd"), "yes", 256),
    ("cpu", False): Sizes([1024], [64], ["fp32"], 1024, 256, ("fwd", "fwd+bwd"), "yes", 256),
    ("cpu", True): Sizes([64], [32], ["fp32"], 64, 64, ("fwd", "fwd+bwd"), "yes", 16),
}


# Per (case, device, --quick). The gqa and varlen cases keep to fwd and fwd+bwd, and on a CPU to one
# size, so that they add about a minute to the main grid's ten.
DEFAULTS = {
    ("grid", "cuda", False): Sizes([512, 1024, 2048, 4096, 8192, 16384], [64, 128], ["fp16", "bf16"], 16384, 2048),
    ("grid", "cuda", True): Sizes([512, 1024], [64], ["fp16"], 4096, 2048),
    ("grid", "cpu", False): Sizes([128, 256, 512, 1024], [64], ["fp32", "bf16"], 2048, 512),
    ("grid", "cpu", True): Sizes([64, 128], [32], ["fp32"], 256, 64),
    ("gqa", "cuda", False): Sizes([1024, 2048, 4096, 8192], [128], ["bf16"], 16384, (32, 8), ("fwd", "fwd+bwd"), "yes"),
    ("gqa", "cuda", True): Sizes([1024], [128], ["fp16"], 4096, (32, 8), ("fwd", "fwd+bwd"), "yes"),
    ("gqa", "cpu", False): Sizes([256], [64], ["fp32"], 256, (32, 8), ("fwd", "fwd+bwd"), "yes"),
    ("gqa", "cpu", True): Sizes([64], [32], ["fp32"], 64, (8, 2), ("fwd", "fwd+bwd"), "yes"),
    ("varlen", "cuda", False): Sizes([1024, 2048, 4096, 8192], [128], ["bf16"], 16384, 2048, ("fwd", "fwd+bwd")),
    ("varlen", "cuda", True): Sizes([1024], [128], ["fp16"], 4096, 2048, ("fwd", "fwd+bwd")),
    ("varlen", "cpu", False): Sizes([256], [64], ["fp32"], 1024, 512, ("fwd", "fwd+bwd")),
    ("varlen", "cpu", True): Sizes([64], [32], ["fp32"], 256, 64, ("fwd", "fwd+bwd")),
    **{(option, device, quick): sizes for option in OPTIONS for (device, quick), sizes in OPTION_SIZES.items()},
}


EXAMPLES = """examples:
  python -m benchmarks --quick
  python -m benchmarks --providers cpu,sdpa-flash --tokens 1 --hidden 512 --seqlens 1024,2048 --threads 1
  python -m benchmarks --cases gqa,varlen --providers cpu,sdpa-flash,naive    # issue 10's rows only
  python -m benchmarks --cases options --window 512                           # issue 11's rows only
  python -m benchmarks --out benchmarks/results/cpu      # replace the committed CPU results, deliberately

Flags left out take each case's own defaults; flags given apply to every case run.
"""


def _default(case, field):
    """A case's default of ``field`` on a GPU and on a CPU, for --help."""
    text = lambda value: comma(value) if isinstance(value, (list, tuple)) else value
    gpu, cpu = (getattr(DEFAULTS[case, device, False], field) for device in ("cuda", "cpu"))
    return f"GPU {text(gpu)}, CPU {text(cpu)}"


def parse_args(argv=None):
    p = parser("python -m benchmarks", __doc__, EXAMPLES)
    p.add_argument("--device", choices=("cuda", "cpu"), help="where to run (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny lengths, one head dim, one dtype")
    p.add_argument("--cases", type=name_list, default="grid,gqa,varlen,options,decode",
                   help="comma list of grid (the main sweep), gqa (grouped-query heads), varlen (mixed lengths), "
                        f"options (the score options: {','.join(OPTIONS)}, also one by one), decode (a KV cache: "
                        "python -m benchmarks.decode has its own flags)")
    p.add_argument("--modes", type=name_list,
                   help=f"comma list of fwd,bwd,fwd+bwd (default: grid {comma(MODES)}, the others fwd,fwd+bwd)")
    p.add_argument("--seqlens", type=int_list, help=f"comma list of sequence lengths N, the longest in varlen "
                   f"(default: grid {_default('grid', 'seqlens')}; gqa and varlen {_default('gqa', 'seqlens')}; options "
                   f"{_default('window', 'seqlens')})")
    p.add_argument("--head-dims", type=int_list, help=f"comma list of head dims d (default: grid "
                   f"{_default('grid', 'head_dims')}; the others {_default('gqa', 'head_dims')})")
    p.add_argument("--dtypes", type=name_list, help=f"comma list of {','.join(DTYPES)} (default: grid "
                   f"{_default('grid', 'dtypes')}; the others {_default('gqa', 'dtypes')})")
    p.add_argument("--causal", choices=("both", "yes", "no"), help="(default: both; gqa and options: yes, as in a decoder)")
    p.add_argument("--tokens", type=int, help=f"batch * N, kept constant across N (default: grid {_default('grid', 'tokens')}; "
                   f"gqa {_default('gqa', 'tokens')}; varlen and options {_default('varlen', 'tokens')})")
    p.add_argument("--hidden", type=int, help=f"heads * d, kept constant across d, grid, varlen and options (default: "
                   f"{_default('grid', 'heads')}; options {_default('window', 'heads')})")
    p.add_argument("--window", type=int, help=f"L of the window case: window (L, 0), or (L, L) without causal "
                   f"(default: {_default('window', 'window')}, --quick {OPTION_SIZES['cpu', True].window})")
    p.add_argument("--gqa-heads", type=int_list, help=f"query heads,KV heads of the gqa case (default: "
                   f"{_default('gqa', 'heads')})")
    p.add_argument("--providers", type=name_list, help="comma list of provider names (default: all); in gqa and "
                   "varlen a name selects its variants too: cpu selects cpu-varlen, sdpa-flash sdpa-flash-gqa")
    p.add_argument("--cpu-min-time", type=float, default=None,
                   help="seconds of repeats per provider and case on a CPU, at least 5 each (default: 0.2, --quick 0.02)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--out", type=pathlib.Path,
                   help="output folder (default: a new benchmarks/runs/<device>-<UTC time>/)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress at all (default: a bar on a terminal, else one line per case)")
    args = p.parse_args(argv)
    check_providers_and_modes(p, args)
    for flag, values in (("--seqlens", args.seqlens), ("--head-dims", args.head_dims), ("--tokens", [args.tokens]),
                         ("--hidden", [args.hidden]), ("--threads", [args.threads]), ("--gqa-heads", args.gqa_heads),
                         ("--window", [args.window])):
        if any(v is not None and v < 1 for v in values or []):
            p.error(f"{flag} must be positive, got {values}")
    for dtype in args.dtypes or []:
        if dtype not in DTYPES:
            p.error(f"--dtypes: {dtype!r} is not one of {','.join(DTYPES)}")
    for case in args.cases:
        if case not in CASES and case not in CASE_SETS and case != "decode":
            p.error(f"--cases: {case!r} is not one of {comma([*CASES, *CASE_SETS, 'decode'])}")
    # A case set stands for its cases; a case named twice runs once.
    args.cases = list(dict.fromkeys(c for case in args.cases for c in CASE_SETS.get(case, [case])))
    if args.gqa_heads is not None and (len(args.gqa_heads) != 2 or args.gqa_heads[0] % args.gqa_heads[1]
                                       or args.gqa_heads[0] == args.gqa_heads[1]):
        p.error(f"--gqa-heads: want query heads,KV heads with the first a multiple (> 1) of the second, "
                f"got {args.gqa_heads}")
    return args


def case_plan(case, args, device):
    """The (config, mode) pairs of one case: its defaults on ``device``, overridden by the flags given."""
    sizes = DEFAULTS[case, device.type, args.quick]
    seqlens, head_dims = args.seqlens or sizes.seqlens, args.head_dims or sizes.head_dims
    dtypes, tokens, modes = args.dtypes or sizes.dtypes, args.tokens or sizes.tokens, args.modes or sizes.modes
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal or sizes.causal]
    if case == "gqa":
        heads, kv_heads = args.gqa_heads or sizes.heads
        configs = gqa_grid(seqlens, head_dims, dtypes, causals, tokens, heads, kv_heads)
        what = f"{heads} query / {kv_heads} KV heads"
    elif case in OPTIONS:
        hidden = args.hidden or sizes.heads
        window = args.window if args.window is not None else sizes.window
        configs = option_grid(case, seqlens, head_dims, dtypes, causals, tokens, hidden, window)
        what = f"heads*d = {hidden}" + (f"; window (L, 0) causal, (L, L) not, L = {window}" if case == "window" else "")
    else:
        hidden = args.hidden or sizes.heads
        configs = (token_budget_grid if case == "grid" else varlen_grid)(seqlens, head_dims, dtypes, causals, tokens,
                                                                         hidden)
        what = f"heads*d = {hidden}"
    longest = "the longest " if case == "varlen" else ""
    summary = (f"{case}: {longest}N {seqlens}; d {head_dims}; {','.join(dtypes)}; causal {args.causal or sizes.causal}; "
               f"batch*N = {tokens} tokens; {what}; modes {','.join(modes)}")
    return [(config, mode) for config in configs for mode in modes], summary


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_min_time = args.cpu_min_time if args.cpu_min_time is not None else (0.02 if args.quick else 0.2)
    out_dir = (args.out or default_out_dir(device_slug(device))).resolve()
    run_decode = "decode" in args.cases
    args.cases = [case for case in args.cases if case != "decode"]
    providers = {case: select_providers(args.providers, case) for case in args.cases}

    if device.type == "cpu":
        print(
            "No GPU in use: benchmarking the CPU paths (our 'cpu' backend, naive, SDPA flash/math on CPU, "
            "FlexAttention forward) at small sizes. Peak memory on CPU comes from torch.profiler's "
            "allocator events."
        )
    if args.cases:
        run_attention_cases(args, device, providers, cpu_min_time, out_dir)
    if run_decode:
        print()
        decode.run(device, args.quick, out_dir, cpu_min_time_s=cpu_min_time)


def run_attention_cases(args, device, providers, cpu_min_time, out_dir):
    """The cases timed per provider and mode: one table, benchmark.json and the plots."""
    cases = []
    for case in args.cases:
        plan, summary = case_plan(case, args, device)
        print(f"device {device}; {summary}")
        cases += plan
    rows = run_benchmarks(providers, cases, device, cpu_min_time, progress=False if args.no_progress else None)

    table = format_table(rows)
    warning = busy_warning(rows)
    if warning:
        table += "\n\n" + warning
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.txt").write_text(table.lstrip("\n") + "\n")
    write_json(rows, out_dir / "benchmark.json")
    plots = plot_results(rows, out_dir)
    print()
    for path in [out_dir / "benchmark.json", out_dir / "table.txt", *plots]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
