"""Measuring providers over a grid of attention shapes: one result row per provider x config x mode."""
import dataclasses
import datetime
import importlib.metadata
import platform
import sys
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .cases import DTYPES, case_inputs
from .flops import tflops_per_second
from .providers import needs_grad
from .timing import (
    BUSY_SPREAD,
    CPU_MEMORY_METHOD,
    CUDA_MEMORY_METHOD,
    free_memory,
    peak_memory_bytes,
    summarize,
    synchronize,
    times_ms,
)

# Columns comparing a row with another provider's time on the same config and mode.
COMPARISONS = {"speedup_vs_naive": "naive", "ratio_vs_sdpa_flash": "sdpa-flash", "ratio_vs_sdpa_cudnn": "sdpa-cudnn"}


@dataclass
class Measurement:
    status: str  # "ok", "OOM", "skipped" (the provider's why_not) or "error"
    ms: float = float("nan")  # median wall-clock time
    spread: float = float("nan")  # interquartile range / median of the repeats
    cpu_ms: float = float("nan")  # median CPU time of the process (all threads), on a CPU
    cpu_spread: float = float("nan")
    repeats: int = 0
    peak_bytes: float = float("nan")
    reason: str = ""


def describe(exc):
    """An exception in one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _failure(provider, config, mode, device, exc):
    if isinstance(exc, torch.OutOfMemoryError):
        result = Measurement("OOM", reason="out of memory")
    else:
        result = Measurement("error", reason=describe(exc))
        tqdm.write(f"{provider.name} {mode} {config}: {result.reason}", file=sys.stderr)
    # The failed call's tensors were held by the exception's traceback, gone now: give their memory back.
    free_memory(device)
    return result


def measure_all(providers, config, mode, device, cpu_min_time_s=0.2, min_rounds=5, memory=True):
    """Time and peak memory of each provider on one config and mode.

    On a CPU the providers are timed together, interleaved; on a GPU one after the other, each one's
    tensors freed before the next allocates. A provider's why_not makes its measurement "skipped";
    out of memory and errors become the status. On a CPU, at least ``min_rounds`` rounds, and more
    until each provider has run ``cpu_min_time_s``; ``memory=False`` skips the peak-memory call.
    """
    if device.type == "cuda" and len(providers) > 1:
        return [measure_all([p], config, mode, device, cpu_min_time_s, min_rounds, memory)[0] for p in providers]
    results = [Measurement("skipped")] * len(providers)
    steps = {}
    for i, provider in enumerate(providers):
        reason = provider.why_not(device, DTYPES[config.dtype], config.head_dim, config.causal, mode)
        if reason:
            results[i] = Measurement("skipped", reason=reason)
            continue
        try:
            q, k, v, extra = case_inputs(config, provider.form, device, needs_grad(mode))
            step = provider.step(mode, q, k, v, config.causal, **extra)
            step()  # compilation and autotuning happen here, outside what is measured
            synchronize(device)
            results[i] = Measurement("ok", peak_bytes=peak_memory_bytes(step, device) if memory else float("nan"))
            steps[i] = step
        except Exception as exc:  # a provider failing must not end the whole sweep; the row says why
            results[i] = _failure(provider, config, mode, device, exc)
    if not steps:
        return results
    try:
        all_times = times_ms(list(steps.values()), device, cpu_min_time_s, min_rounds)
    except Exception as exc:  # which provider failed is unknown: every timed one gets the error
        failure = _failure(providers[next(iter(steps))], config, mode, device, exc)
        return [failure if i in steps else r for i, r in enumerate(results)]
    for i, (wall, cpu) in zip(steps, all_times):
        median, spread = summarize(wall)
        cpu_median, cpu_spread = summarize(cpu) if cpu else (float("nan"), float("nan"))
        results[i] = dataclasses.replace(results[i], ms=median, spread=spread, cpu_ms=cpu_median,
                                         cpu_spread=cpu_spread, repeats=len(wall))
    return results


def measure(provider, config, mode, device, cpu_min_time_s=0.2):
    """Time and peak memory of one provider on one config; OOM and errors become the row's status."""
    return measure_all([provider], config, mode, device, cpu_min_time_s)[0]


def result_row(provider, config, mode, measurement, env):
    """One JSON-ready row: the config, the measurement and its derived numbers, the environment."""
    flops = config.flops(mode)
    return {
        "provider": provider.name,
        "mode": mode,
        "case": config.case,
        **asdict(config),
        "status": measurement.status,
        "reason": measurement.reason,
        "ms": measurement.ms,
        "spread": measurement.spread,
        "cpu_ms": measurement.cpu_ms,
        "cpu_spread": measurement.cpu_spread,
        "repeats": measurement.repeats,
        "tflops": tflops_per_second(flops, measurement.ms),
        "peak_memory_mib": measurement.peak_bytes / 2**20,
        "flops": flops,
        **env,
    }


def _case_line(config, mode, rows):
    """One line per case, for logs: each provider's median time and spread, or why it has none."""
    cells = [
        f"{r['provider']} {r['ms']:.3f} ms ±{r['spread'] / 2:.0%}" if r["status"] == "ok" else f"{r['provider']} {r['status']}"
        for r in rows
        if r["status"] != "skipped"
    ]
    case = "" if config.case == "grid" else f"{config.case} "
    return f"{mode} {config.dtype} {'causal' if config.causal else 'non-causal'} {case}{config.shape()}: {'; '.join(cells)}"


def run_benchmarks(providers, cases, device, cpu_min_time_s=0.2, progress=None):
    """Each (config, mode) of ``cases`` timed with the providers of its case (``providers``: case name ->
    list); returns JSON-ready rows with comparisons filled in.

    ``progress``: a progress bar (True), one line per case on stderr (None: the bar on a terminal,
    lines otherwise, as in a log or CI), or nothing (False).
    """
    env = environment(device)
    if progress is None:
        progress = True if sys.stderr.isatty() else "lines"
    rows = []
    bar = tqdm(cases, disable=progress is not True, unit="case", file=sys.stderr)
    for config, mode in bar:
        bar.set_description(f"{mode:>7} {config.case} {config.dtype} N={config.seqlen} d={config.head_dim}")
        case_providers = providers[config.case]
        measurements = measure_all(case_providers, config, mode, device, cpu_min_time_s)
        case_rows = [result_row(p, config, mode, m, env) for p, m in zip(case_providers, measurements)]
        if progress == "lines":
            print(_case_line(config, mode, case_rows), file=sys.stderr, flush=True)
        rows += case_rows
    add_comparisons(rows)
    return rows


def busy_warning(rows):
    """A warning when the spread of the repeats says the machine was busy, else None."""
    ok = [r for r in rows if r["status"] == "ok"]
    busy = [r for r in ok if r["spread"] > BUSY_SPREAD]
    if not busy:
        return None
    worst = max(r["spread"] for r in busy)
    return (
        f"warning: {len(busy)} of {len(ok)} timings spread over {BUSY_SPREAD:.0%} (interquartile range / median; "
        f"worst {worst:.0%}): the machine was busy. Times are unreliable; ratios between providers, "
        f"timed in the same rounds, less so. For a before/after, count instructions: python -m benchmarks.callgrind"
    )


def _config_key(row):
    keys = ("case", "mode", "batch", "heads", "kv_heads", "seqlen", "head_dim", "causal", "dtype", "lengths", "window")
    return tuple(tuple(row.get(key) or ()) if key == "lengths" else row.get(key) for key in keys)


def add_comparisons(rows):
    """speedup_vs_naive = naive's ms / this ms (and likewise for SDPA flash, cuDNN): > 1 is faster."""
    ms_by_provider = {(row["provider"], _config_key(row)): row["ms"] for row in rows}
    for row in rows:
        for column, other in COMPARISONS.items():
            other_ms = ms_by_provider.get((other, _config_key(row)), float("nan"))
            row[column] = other_ms / row["ms"]  # nan when either is nan


def device_slug(device):
    """A folder name for a device's results: "cpu", or the GPU's name like "nvidia-h100-80gb-hbm3"."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def _cpu_info():
    """/proc/cpuinfo's first processor as a dict ({} where there is none)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


# fp32 FLOP per cycle per core, assuming two FMA units (2 units x lanes x 2 flops per FMA).
FLOP_PER_CYCLE = (("avx512f", 2 * 16 * 2, "AVX-512 FMA"), ("avx2", 2 * 8 * 2, "AVX2 FMA"), ("sse2", 2 * 4 * 2, "SSE"))


def cpu_peak(threads, info=None):
    """(peak fp32 GFLOP/s of ``threads`` cores, how it was computed), or (nan, reason) when unknown.

    The clock is /proc/cpuinfo's "cpu MHz", the nominal one in a VM: a core that boosts above it can
    pass this "peak" (measured on the 2-core AMD EPYC: see benchmarks/NOTES.md).
    """
    info = _cpu_info() if info is None else info
    flags = set(info.get("flags", "").split())
    try:
        ghz = float(info["cpu MHz"]) / 1e3
    except (KeyError, ValueError):
        return float("nan"), "unknown (no clock in /proc/cpuinfo)"
    flop, isa = next(((f, isa) for flag, f, isa in FLOP_PER_CYCLE if flag in flags), (FLOP_PER_CYCLE[-1][1:]))
    peak = threads * ghz * flop
    how = f"{threads} cores x {ghz:.2f} GHz x {flop} FLOP/cycle ({isa}, fp32) = {peak:.1f} GFLOP/s"
    if "avx512_bf16" in flags:
        how += f"; bf16 (vdpbf16ps, 2 products a lane): {2 * peak:.1f} GFLOP/s"
    return peak, how


def cpu_bf16_speedup(info=None):
    """How many times the fp32 peak a CPU's bf16 products reach: 2 with AVX512_BF16's vdpbf16ps (two bf16
    products summed into each float lane per instruction), else 1 (bf16 is converted to float)."""
    info = _cpu_info() if info is None else info
    return 2 if "avx512_bf16" in set(info.get("flags", "").split()) else 1


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_isa():
    """The instruction set of our CPU kernels' tile products (csrc/cpu/isa.h), or None without them."""
    try:
        import attention._C  # noqa: F401
    except ImportError:
        return None
    return torch.ops.fused_attention.cpu_isa()


def environment(device):
    """What a result row must carry to be compared with another machine's."""
    peak, bf16_peak, peak_how = float("nan"), float("nan"), None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        info = _cpu_info()
        name = f"{info.get('model name') or platform.processor() or platform.machine()}, threads={torch.get_num_threads()}"
        peak, peak_how = cpu_peak(torch.get_num_threads(), info)
        bf16_peak = peak * cpu_bf16_speedup(info)
    return {
        "device": device.type,
        "device_name": name,
        "peak_gflops": peak,
        "peak_gflops_bf16": bf16_peak,
        "cpu_isa": _cpu_isa() if device.type == "cpu" else None,
        "peak_how": peak_how,
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "cuda_version": torch.version.cuda,
        "memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
