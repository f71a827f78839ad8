"""Measuring providers over a grid of attention shapes: one result row per provider x config x mode."""
import datetime
import importlib.metadata
import platform
import sys
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .flops import attention_flops, tflops_per_second
from .providers import needs_grad
from .timing import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, free_memory, median_ms, peak_memory_bytes, synchronize

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Columns comparing a row with another provider's time on the same config and mode.
COMPARISONS = {"speedup_vs_naive": "naive", "ratio_vs_sdpa_flash": "sdpa-flash", "ratio_vs_sdpa_cudnn": "sdpa-cudnn"}


@dataclass(frozen=True)
class Config:
    """One attention shape: (batch, heads, seqlen, head_dim) for q, k and v alike."""

    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    dtype: str  # a key of DTYPES

    def flops(self, mode):
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim, self.causal, mode)


def token_budget_grid(seqlens, head_dims, dtypes, causals, tokens, hidden):
    """The FlashAttention paper's sweep: batch * seqlen = ``tokens``, heads * head_dim = ``hidden``."""
    return [
        Config(max(1, tokens // n), max(1, hidden // d), n, d, causal, dtype)
        for dtype in dtypes
        for causal in causals
        for d in head_dims
        for n in seqlens
    ]


@dataclass
class Measurement:
    status: str  # "ok", "OOM", "skipped" (the provider's why_not) or "error"
    ms: float = float("nan")
    peak_bytes: float = float("nan")
    reason: str = ""


def make_inputs(config, device, requires_grad):
    shape = (config.batch, config.heads, config.seqlen, config.head_dim)
    return [
        torch.randn(shape, device=device, dtype=DTYPES[config.dtype], requires_grad=requires_grad)
        for _ in range(3)
    ]


def _measure_ok(provider, config, mode, device, cpu_min_time_s):
    step = provider.step(mode, *make_inputs(config, device, needs_grad(mode)), config.causal)
    step()  # compilation and autotuning happen here, outside what is measured
    synchronize(device)
    peak = peak_memory_bytes(step, device)
    return Measurement("ok", median_ms(step, device, cpu_min_time_s), peak)


def describe(exc):
    """An exception in one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def measure(provider, config, mode, device, cpu_min_time_s=0.2):
    """Time and peak memory of one provider on one config; OOM and errors become the row's status."""
    reason = provider.why_not(device, DTYPES[config.dtype], config.head_dim, config.causal, mode)
    if reason:
        return Measurement("skipped", reason=reason)
    try:
        return _measure_ok(provider, config, mode, device, cpu_min_time_s)
    except torch.OutOfMemoryError:
        result = Measurement("OOM", reason="out of memory")
    except Exception as exc:  # a provider failing must not end the whole sweep; the row says why
        result = Measurement("error", reason=describe(exc))
        tqdm.write(f"{provider.name} {mode} {config}: {result.reason}", file=sys.stderr)
    # The failed call's tensors were held by the exception's traceback, gone now: give their memory back.
    free_memory(device)
    return result


def result_row(provider, config, mode, measurement, env):
    """One JSON-ready row: the config, the measurement and its derived numbers, the environment."""
    flops = config.flops(mode)
    return {
        "provider": provider.name,
        "mode": mode,
        **asdict(config),
        "status": measurement.status,
        "reason": measurement.reason,
        "ms": measurement.ms,
        "tflops": tflops_per_second(flops, measurement.ms),
        "peak_memory_mib": measurement.peak_bytes / 2**20,
        "flops": flops,
        **env,
    }


def run_benchmarks(providers, configs, modes, device, cpu_min_time_s=0.2, progress=True):
    """Every provider on every config and mode; returns JSON-ready rows with comparisons filled in."""
    env = environment(device)
    jobs = [(config, mode, provider) for config in configs for mode in modes for provider in providers]
    rows = []
    bar = tqdm(jobs, disable=not progress, unit="run", file=sys.stderr)
    for config, mode, provider in bar:
        bar.set_description(f"{provider.name:>14} {mode:>7} N={config.seqlen}")
        measurement = measure(provider, config, mode, device, cpu_min_time_s)
        rows.append(result_row(provider, config, mode, measurement, env))
    add_comparisons(rows)
    return rows


def _config_key(row):
    return tuple(row[key] for key in ("mode", "batch", "heads", "seqlen", "head_dim", "causal", "dtype"))


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


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device):
    """What a result row must carry to be compared with another machine's."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()}, threads={torch.get_num_threads()}"
    return {
        "device": device.type,
        "device_name": name,
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "cuda_version": torch.version.cuda,
        "memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
