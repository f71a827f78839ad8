"""The main job: `python -m benchmarks` times every attention provider, prints a table, writes JSON and plots.

Default on a GPU: the FlashAttention paper's sweep (batch * N = 16K tokens, hidden 2048 so heads =
2048 / d, d in {64, 128}, N = 512 .. 16K, causal and not, fp16 and bf16, forward, backward and both).
Without a GPU: the CPU paths at small sizes (it says so). ``--quick`` is a smoke run of seconds.
Each run writes to a folder of its own, benchmarks/runs/<device>-<UTC time>/ (or ``--out``); the
committed results in benchmarks/results/ change only when ``--out`` names them.
"""
import pathlib
import sys

import torch

from .cli import check_providers_and_modes, comma, int_list, name_list, parser
from .flops import MODES
from .providers import select_providers
from .report import default_out_dir, format_table, plot_results, write_json
from .run import DTYPES, busy_warning, device_slug, run_benchmarks, token_budget_grid

# (seqlens, head_dims, dtypes, tokens, hidden) per device and size.
DEFAULTS = {
    ("cuda", False): ([512, 1024, 2048, 4096, 8192, 16384], [64, 128], ["fp16", "bf16"], 16384, 2048),
    ("cuda", True): ([512, 1024], [64], ["fp16"], 4096, 2048),
    ("cpu", False): ([128, 256, 512, 1024], [64], ["fp32", "bf16"], 2048, 512),
    ("cpu", True): ([64, 128], [32], ["fp32"], 256, 64),
}


EXAMPLES = """examples:
  python -m benchmarks --quick
  python -m benchmarks --providers cpu,sdpa-flash --tokens 1 --hidden 512 --seqlens 1024,2048 --threads 1
  python -m benchmarks --out benchmarks/results/cpu      # replace the committed CPU results, deliberately

"""


def parse_args(argv=None):
    gpu, cpu = DEFAULTS["cuda", False], DEFAULTS["cpu", False]
    p = parser("python -m benchmarks", __doc__, EXAMPLES)
    p.add_argument("--device", choices=("cuda", "cpu"), help="where to run (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="a smoke run: two tiny lengths, one head dim, one dtype")
    p.add_argument("--modes", type=name_list, default=",".join(MODES), help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--seqlens", type=int_list, help=f"comma list of sequence lengths N (default: GPU {comma(gpu[0])}, CPU {comma(cpu[0])})")
    p.add_argument("--head-dims", type=int_list, help=f"comma list of head dims d (default: GPU {comma(gpu[1])}, CPU {comma(cpu[1])})")
    p.add_argument("--dtypes", type=name_list, help=f"comma list of {','.join(DTYPES)} (default: GPU {comma(gpu[2])}, CPU {comma(cpu[2])})")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--tokens", type=int, help=f"batch * N, kept constant across N (default: GPU {gpu[3]}, CPU {cpu[3]})")
    p.add_argument("--hidden", type=int, help=f"heads * d, kept constant across d (default: GPU {gpu[4]}, CPU {cpu[4]})")
    p.add_argument("--providers", type=name_list, help="comma list of provider names (default: all)")
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
                         ("--hidden", [args.hidden]), ("--threads", [args.threads])):
        if any(v is not None and v < 1 for v in values or []):
            p.error(f"{flag} must be positive, got {values}")
    for dtype in args.dtypes or []:
        if dtype not in DTYPES:
            p.error(f"--dtypes: {dtype!r} is not one of {','.join(DTYPES)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    seqlens, head_dims, dtypes, tokens, hidden = DEFAULTS[(device.type, args.quick)]
    seqlens, head_dims = args.seqlens or seqlens, args.head_dims or head_dims
    dtypes, tokens, hidden = args.dtypes or dtypes, args.tokens or tokens, args.hidden or hidden
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    cpu_min_time = args.cpu_min_time if args.cpu_min_time is not None else (0.02 if args.quick else 0.2)
    out_dir = (args.out or default_out_dir(device_slug(device))).resolve()
    providers = select_providers(args.providers)

    if device.type == "cpu":
        print(
            "No GPU in use: benchmarking the CPU paths (our 'cpu' backend, naive, SDPA flash/math on CPU, "
            "FlexAttention forward) at small sizes. Peak memory on CPU comes from torch.profiler's "
            "allocator events."
        )
    print(
        f"device {device}; N {seqlens}; d {head_dims}; {','.join(dtypes)}; causal {args.causal}; "
        f"batch*N = {tokens} tokens; heads*d = {hidden}; modes {','.join(args.modes)}"
    )
    configs = token_budget_grid(seqlens, head_dims, dtypes, causals, tokens, hidden)
    rows = run_benchmarks(providers, configs, args.modes, device, cpu_min_time,
                          progress=False if args.no_progress else None)

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
