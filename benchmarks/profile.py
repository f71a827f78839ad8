"""Long-context profiler: `python -m benchmarks.profile` doubles N until each provider runs out of memory or time.

Default on a GPU: B=1, H=16, d=128, bf16, causal, forward and fwd+bwd, N from 1K; our backends go
to 1M tokens (2^20), baselines stop once their next call would pass --time-limit seconds. Records
time and peak memory, fits the scaling exponents (time ~ N^a, memory ~ N^b) over the largest points,
says where each provider stopped (naive attention: out of memory), and plots both, log-log.
``--window L`` profiles a sliding window (L, 0) instead of the causal mask: the window case's
providers (ours and naive given the window, SDPA a bool mask), our time growing as N (N * L pairs).
``--trace N`` instead profiles one call of each provider at length N into a Chrome/Perfetto trace
(open in ui.perfetto.dev), with a torch.profiler range and an NVTX range (for Nsight) per call.
``--world-size W`` profiles context-parallel ring attention (``attention.distributed.ring_attention``,
zigzag layout, our "auto" backend) on W local processes, NCCL over W GPUs or gloo on the CPU: each rank
holds N / W tokens, and each rank's peak memory and time are reported and fitted (N is the whole
sequence; TFLOP/s counts the whole group's work).
Without a GPU: the same at small sizes on the CPU (it says so). Each run writes to a folder of its
own, benchmarks/runs/profile-<device>-<UTC time>/ (or ``--out``).
"""
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import tempfile
import time
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from attention.distributed import ring_attention  # noqa: E402

from .cases import DTYPES, Config, case_inputs, make_inputs  # noqa: E402
from .cli import check_providers_and_modes, name_list, parser  # noqa: E402
from .providers import needs_grad, select_providers  # noqa: E402
from .report import default_out_dir, log_y_axis, seqlen_axis, write_json  # noqa: E402
from .run import Measurement, describe, device_slug, environment, measure, result_row  # noqa: E402
from .scaling import fit_exponent  # noqa: E402
from .timing import free_memory, peak_memory_bytes, summarize, synchronize  # noqa: E402

# At fixed batch and heads attention's work grows as N^2: doubling N quadruples the next call.
NEXT_CALL_GROWTH = 4.0

# (batch, heads, head_dim, dtype, first N, last N, time limit for baselines, for ours) per device.
DEFAULTS = {
    "cuda": (1, 16, 128, "bf16", 1024, 2**20, 20.0, 300.0),
    "cpu": (1, 4, 64, "fp32", 128, 8192, 1.0, 5.0),
}


# The fields of a result row that make its Config (for a plot title).
CONFIG_FIELDS = ("batch", "heads", "seqlen", "head_dim", "causal", "dtype", "option", "window")


def _shape(config):
    """What a profile holds fixed, in a few words: "B=1 H=4 d=64 fp32 causal", with its window if any."""
    window = f" window {config.window_bounds}" if config.option == "window" else ""
    return f"B={config.batch} H={config.heads} d={config.head_dim} {config.dtype}{' causal' if config.causal else ''}{window}"


EXAMPLES = """examples:
  python -m benchmarks.profile --threads 1
  python -m benchmarks.profile --trace 4096 --providers cpu,sdpa-flash
  python -m benchmarks.profile --window 256 --max-seqlen 32768     # time ~ N^1 for ours
  python -m benchmarks.profile --world-size 4                      # ring attention, memory per rank ~ N/4

"""


def _defaults(index):
    return f"(default: GPU {DEFAULTS['cuda'][index]}, CPU {DEFAULTS['cpu'][index]})"


def parse_args(argv=None):
    p = parser("python -m benchmarks.profile", __doc__, EXAMPLES)
    p.add_argument("--device", choices=("cuda", "cpu"), help="where to run (default: cuda when available)")
    p.add_argument("--providers", type=name_list, help="comma list of provider names (default: all)")
    p.add_argument("--modes", type=name_list, default="fwd,fwd+bwd", help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--batch", type=int, help=f"B {_defaults(0)}")
    p.add_argument("--heads", type=int, help=f"H {_defaults(1)}")
    p.add_argument("--head-dim", type=int, help=f"d {_defaults(2)}")
    p.add_argument("--dtype", choices=tuple(DTYPES), help=f"{_defaults(3)}")
    p.add_argument("--non-causal", action="store_true", help="profile without the causal mask")
    p.add_argument("--window", type=int, metavar="L",
                   help="profile a sliding window (L, 0), causal ((L, L) with --non-causal), not the plain mask")
    p.add_argument("--start", type=int, help=f"first sequence length {_defaults(4)}")
    p.add_argument("--max-seqlen", type=int, help=f"last sequence length {_defaults(5)}")
    p.add_argument("--time-limit", type=float,
                   help=f"seconds: a baseline stops when its next call would pass it {_defaults(6)}")
    p.add_argument("--ours-time-limit", type=float, help=f"the same, for our backends {_defaults(7)}")
    p.add_argument("--fit-points", type=int, default=4, help="how many of the largest N the exponent fit uses")
    p.add_argument("--cpu-min-time", type=float, default=0.2, help="seconds of repeats per CPU timing")
    p.add_argument("--trace", type=int, metavar="N", help="write a profiler trace of one call per provider at N")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's own choice; with --world-size, the cores / W per rank)")
    p.add_argument("--world-size", type=int, metavar="W",
                   help="profile ring attention over W local processes (one per GPU, or gloo on the CPU)")
    p.add_argument("--ring-repeats", type=int, default=5,
                   help="timed calls per length with --world-size (a fixed count: every rank must make each call)")
    p.add_argument("--out", type=pathlib.Path,
                   help="output folder (default: a new benchmarks/runs/profile-<device>-<UTC time>/)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress at all (default: a bar on a terminal, else one line per measurement)")
    args = p.parse_args(argv)
    check_providers_and_modes(p, args)
    if args.fit_points < 2:
        p.error(f"--fit-points must be at least 2 (a line needs two points), got {args.fit_points}")
    for flag in ("batch", "heads", "head_dim", "start", "max_seqlen", "trace", "threads", "window", "world_size",
                 "ring_repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.world_size is not None:
        for flag in ("trace", "window", "providers"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag} does not go with --world-size (the ring profiles our ring attention, causal or not)")
        if "bwd" in args.modes:
            p.error("--modes: with --world-size, fwd and fwd+bwd only")
    return args


def sweep(providers, modes, base, max_seqlen, limits, device, cpu_min_time_s, progress=None):
    """Each provider from ``base.seqlen`` doubling to ``max_seqlen``; returns (rows, why each one stopped).

    ``limits[is_ours]`` is the longest call in seconds a provider may be asked for. ``progress``: a bar
    (True), one line per measurement on stderr (None: the bar on a terminal, lines otherwise), or nothing.
    """
    env = environment(device)
    rows, stops = [], {}
    if progress is None:
        progress = True if sys.stderr.isatty() else "lines"
    bar = tqdm(disable=progress is not True, unit="run", file=sys.stderr)
    for mode in modes:
        for provider in providers:
            limit_s = limits[provider.is_ours]
            n = base.seqlen
            while True:
                bar.set_description(f"{provider.name:>14} {mode:>7} N={n}")
                config = dataclasses.replace(base, seqlen=n)
                m = measure(provider, config, mode, device, cpu_min_time_s)
                bar.update()
                if progress == "lines":
                    result = f"{m.ms:.3f} ms ±{m.spread / 2:.0%}" if m.status == "ok" else m.status
                    print(f"{provider.name} {mode} N={n}: {result}", file=sys.stderr, flush=True)
                rows.append(result_row(provider, config, mode, m, env))
                if m.status != "ok":
                    stops[provider.name, mode] = m.reason if m.status == "skipped" else f"{m.status} at N={n}"
                    break
                if n * 2 > max_seqlen:
                    stops[provider.name, mode] = f"reached the last N={n}"
                    break
                next_call_s = m.ms / 1e3 * NEXT_CALL_GROWTH
                if next_call_s > limit_s:
                    stops[provider.name, mode] = f"time limit after N={n} (next call ~{next_call_s:.1f} s > {limit_s:g} s)"
                    break
                n *= 2
    bar.close()
    return rows, stops


def exponents(rows, upper_points):
    """{(provider, mode): (time exponent, memory exponent, work exponent)} over the ``upper_points``
    largest N; the work's (FLOPs ~ N^c: 2 for full or causal attention, about 1 for a window much
    shorter than N) is what the time's should approach."""
    series = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            series[row["provider"], row["mode"]].append(row)
    return {
        key: tuple(fit_exponent([r["seqlen"] for r in rs], [r[metric] for r in rs], upper_points)
                   for metric in ("ms", "peak_memory_mib", "flops"))
        for key, rs in series.items()
    }


def format_report(rows, stops, fits, upper_points):
    lines = [f"{'mode':>8}{'provider':>15}{'N':>9}{'ms':>12}{'TFLOP/s':>9}{'peak MiB':>11}  status"]
    for row in rows:
        if row["status"] == "skipped":
            continue
        lines.append(
            f"{row['mode']:>8}{row['provider']:>15}{row['seqlen']:>9}{row['ms']:>12.3f}{row['tflops']:>9.3f}"
            f"{row['peak_memory_mib']:>11.1f}  {row['status']}"
        )
    lines += ["", f"scaling exponents (least squares in log-log over the {upper_points} largest N):"]
    lines.append(f"{'mode':>8}{'provider':>15}{'time ~ N^a':>12}{'memory ~ N^b':>14}{'FLOPs ~ N^c':>13}  stopped")
    for (name, mode), stop in stops.items():
        a, b, c = (f"{x:.2f}" if math.isfinite(x) else "-" for x in fits.get((name, mode), (math.nan,) * 3))
        lines.append(f"{mode:>8}{name:>15}{a:>12}{b:>14}{c:>13}  {stop}")
    return "\n".join(lines)


def plot_profile(rows, out_dir):
    """Time vs N and peak memory vs N, log-log, one panel per mode, every provider; returns the paths."""
    ok = [r for r in rows if r["status"] == "ok"]
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    providers = sorted({r["provider"] for r in ok})
    paths = []
    for metric, label, name in (("ms", "time per call (ms)", "profile_time.png"),
                                ("peak_memory_mib", "peak memory (MiB)", "profile_memory.png")):
        if not modes:
            break
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for i, provider in enumerate(providers):
                points = sorted((r["seqlen"], r[metric]) for r in ok if (r["provider"], r["mode"]) == (provider, mode))
                if points:
                    ax.plot(*zip(*points), marker="o", label=provider, color=plt.get_cmap("tab10")(i % 10))
            for row in rows:  # mark where a provider ran out of memory
                if row["mode"] == mode and row["status"] == "OOM":
                    ax.axvline(row["seqlen"], color="gray", linestyle=":", linewidth=1)
                    ax.annotate(f"{row['provider']} OOM", (row["seqlen"], 0.02), xycoords=("data", "axes fraction"),
                                rotation=90, fontsize=7, color="gray")
            seqlen_axis(ax, {r["seqlen"] for r in rows if r["mode"] == mode and r["status"] in ("ok", "OOM")})
            log_y_axis(ax)
            ax.set_title(f"{mode}", fontsize=10)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        first = ok[0]
        fig.suptitle(f"{_shape(Config(**{k: first[k] for k in CONFIG_FIELDS}))}, {first['device_name']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


@contextlib.contextmanager
def _ranges(name, device):
    # record_function names the call in the torch.profiler trace; NVTX names it for Nsight Systems.
    with torch.profiler.record_function(name):
        if device.type == "cuda":
            with torch.cuda.nvtx.range(name):
                yield
        else:
            yield


def write_trace(providers, modes, base, n, device, path):
    """One call of each provider and mode at length ``n``, warmed up first, into a Chrome trace JSON."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    config = dataclasses.replace(base, seqlen=n)
    steps = []
    for mode in modes:
        for provider in providers:
            reason = provider.why_not(device, DTYPES[base.dtype], base.head_dim, base.causal, mode)
            if reason:
                print(f"  {provider.name} {mode}: not traced ({reason})")
                continue
            steps.append((f"{provider.name} {mode} N={n}", provider, mode))
    with torch.profiler.profile(activities=activities) as prof:
        for name, provider, mode in steps:
            try:
                q, k, v, extra = case_inputs(config, provider.form, device, needs_grad(mode))
                step = provider.step(mode, q, k, v, base.causal, **extra)
                with torch.profiler.record_function("warm-up"):
                    step()  # compiles and autotunes: kept apart from the call that matters
                with _ranges(name, device):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as exc:  # out of memory, most likely: the other providers still get traced
                print(f"  {name}: not traced ({describe(exc)})")
            step = None  # frees this provider's tensors before the next one allocates
    prof.export_chrome_trace(str(path))


RING_LAYOUT = "zigzag"


def _ring_step(mode, q, k, v, causal):
    """A zero-argument call of ring attention doing ``mode`` (fwd or fwd+bwd) once on this rank's shard."""
    run = lambda: ring_attention(q, k, v, causal=causal, layout=RING_LAYOUT)
    if mode == "fwd":
        return run
    dout = torch.randn_like(q)
    return lambda: torch.autograd.grad(run(), (q, k, v), dout)


def _fixed_times_ms(fn, device, repeats):
    # Not times_ms: its repeat count follows the clock, and every rank must make the same calls.
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _all_ranks_max(value, device):
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _ring_rank(rank, world_size, device_type, base, modes, max_seqlen, limit_s, repeats, threads, out_dir):
    """One rank of the ring profile: N doubling from base.seqlen while the slowest rank's next call fits
    ``limit_s``; writes its rows and stops to out_dir/rank<r>.json."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=world_size)
    env = environment(device)
    provider = f"ring W={world_size} r{rank}"
    rows, stops = [], {}
    try:
        for mode in modes:
            n = base.seqlen
            while True:
                config = dataclasses.replace(base, seqlen=n)
                try:
                    q, k, v = make_inputs(dataclasses.replace(config, seqlen=n // world_size), device, mode != "fwd")
                    step = _ring_step(mode, q, k, v, base.causal)
                    step()  # warm-up (Triton compiles here)
                    peak = peak_memory_bytes(step, device)
                    median, spread = summarize(_fixed_times_ms(step, device, repeats))
                    m = Measurement("ok", ms=median, spread=spread, repeats=repeats, peak_bytes=peak)
                except torch.OutOfMemoryError:  # every rank holds as much, so all of them run out at the same N
                    m = Measurement("OOM", reason="out of memory")
                rows.append({**result_row(_RingProvider(provider), config, mode, m, env), "rank": rank,
                             "world_size": world_size})
                if m.status == "OOM":
                    stops[mode] = f"OOM at N={n}"
                    q = k = v = step = None
                    free_memory(device)
                    break
                slowest_ms = _all_ranks_max(median, device)  # every rank takes the same decision
                if n * 2 > max_seqlen:
                    stops[mode] = f"reached the last N={n}"
                    break
                next_call_s = slowest_ms / 1e3 * NEXT_CALL_GROWTH
                if next_call_s > limit_s:
                    stops[mode] = f"time limit after N={n} (next call ~{next_call_s:.1f} s > {limit_s:g} s)"
                    break
                n *= 2
                del q, k, v, step
                free_memory(device)
    finally:
        dist.destroy_process_group()
    (pathlib.Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"rows": rows, "stops": stops}))


@dataclasses.dataclass(frozen=True)
class _RingProvider:
    """The one field of a Provider that result_row reads."""

    name: str


def ring_profile(world_size, base, modes, max_seqlen, limit_s, repeats, threads, device):
    """(rows, stops) of the ring profile on ``world_size`` local processes; rows are per rank."""
    if device.type == "cuda" and world_size > torch.cuda.device_count():
        sys.exit(f"--world-size {world_size}: NCCL needs one GPU per rank, torch sees {torch.cuda.device_count()}")
    if base.seqlen % (2 * world_size):
        sys.exit(f"--start {base.seqlen}: the zigzag layout needs N divisible by 2 x --world-size = {2 * world_size}")
    if threads is None and device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory() as folder:
        # fork where it is safe (no CUDA in this process): the ranks then start without importing torch again.
        method = "fork" if device.type == "cpu" and "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_ring_rank, args=(world_size, device.type, base, modes, max_seqlen, limit_s, repeats, threads,
                                             folder),
                           nprocs=world_size, start_method=method)
        results = [json.loads(pathlib.Path(folder, f"rank{r}.json").read_text()) for r in range(world_size)]
    rows = sorted((row for result in results for row in result["rows"]),
                  key=lambda row: (modes.index(row["mode"]), row["rank"], row["seqlen"]))
    stops = {(f"ring W={world_size} r{r}", mode): stop for r, result in enumerate(results)
             for mode, stop in result["stops"].items()}
    return rows, stops


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, heads, head_dim, dtype, start, max_seqlen, limit, ours_limit = DEFAULTS[device.type]
    base = Config(
        args.batch or batch, args.heads or heads, args.start or start, args.head_dim or head_dim,
        not args.non_causal, args.dtype or dtype, option=None if args.window is None else "window", window=args.window,
    )
    max_seqlen = args.max_seqlen or max_seqlen
    limits = {False: args.time_limit or limit, True: args.ours_time_limit or ours_limit}
    providers = select_providers(args.providers, base.case)
    ring = f"ring{args.world_size}-" if args.world_size else ""
    out_dir = (args.out or default_out_dir(f"profile-{ring}{device_slug(device)}")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    if device.type == "cpu":
        print("No GPU in use: profiling the CPU paths at small sizes (no out-of-memory on CPU: time limits stop them).")
    shape = _shape(base)
    if args.world_size:
        processes = f"{args.world_size} process{'es' if args.world_size > 1 else ''}"
        print(f"ring attention ({RING_LAYOUT}) on {processes} ({'NCCL' if device.type == 'cuda' else 'gloo'}), "
              f"{shape}: N (the whole sequence) from {base.seqlen} doubling to {max_seqlen}, each rank holding N/"
              f"{args.world_size}; stops when the slowest rank's next call would take over {limits[True]:g} s")
        rows, stops = ring_profile(args.world_size, base, args.modes, max_seqlen, limits[True], args.ring_repeats,
                                   args.threads, device)
        _report(rows, stops, args.fit_points, out_dir)
        return
    if args.trace:
        path = out_dir / f"trace_N{args.trace}.json"
        print(f"tracing one call per provider and mode at N={args.trace}, {shape}, on {device}")
        write_trace(providers, args.modes, base, args.trace, device, path)
        print(f"wrote {path} (open in https://ui.perfetto.dev or chrome://tracing)")
        return

    print(
        f"{shape} on {device}: N from {base.seqlen} doubling to {max_seqlen}; a provider stops at out-of-memory or when "
        f"its next call would take over {limits[False]:g} s ({limits[True]:g} s for ours)"
    )
    rows, stops = sweep(providers, args.modes, base, max_seqlen, limits, device, args.cpu_min_time,
                        progress=False if args.no_progress else None)
    _report(rows, stops, args.fit_points, out_dir)


def _report(rows, stops, fit_points, out_dir):
    """Prints the table and the fits, writes them with the rows' JSON and the plots to ``out_dir``."""
    fits = exponents(rows, fit_points)
    report = format_report(rows, stops, fits, fit_points)
    print(report)
    (out_dir / "profile.txt").write_text(report + "\n")
    write_json(rows, out_dir / "profile.json")
    plots = plot_profile(rows, out_dir)
    print()
    for path in [out_dir / "profile.json", out_dir / "profile.txt", *plots]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
