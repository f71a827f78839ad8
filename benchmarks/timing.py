"""Timing and peak memory of one zero-argument call, on a CUDA GPU or on the CPU."""
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

# do_bench spends a fixed 25 ms warming up and 100 ms repeating, after 5 calls to estimate the time:
# right for calls up to about this long; slower calls (long contexts) get a median of 3 instead.
DO_BENCH_MAX_MS = 200.0

CPU_MEMORY_METHOD = "torch.profiler allocator events (CPU)"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated minus the allocated baseline"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def median_ms(fn, device, cpu_min_time_s=0.2):
    """Median time of ``fn()`` in milliseconds; call ``fn`` once before (compilation, autotuning)."""
    if device.type == "cuda":
        return _cuda_median_ms(fn)
    return _cpu_median_ms(fn, cpu_min_time_s)


def _cuda_event_ms(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _cuda_median_ms(fn):
    import triton.testing

    first = _cuda_event_ms(fn)
    if first <= DO_BENCH_MAX_MS:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return statistics.median([first, _cuda_event_ms(fn), _cuda_event_ms(fn)])


def _cpu_median_ms(fn, min_time_s, min_repeats=3, max_repeats=50):
    times = []
    while len(times) < min_repeats or (sum(times) < min_time_s and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_memory_bytes(fn, device):
    """Bytes allocated by ``fn()`` at its peak, above what was allocated before it ran."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    return _cpu_peak_bytes(fn)


def _cpu_peak_bytes(fn):
    # torch has no CPU counterpart of max_memory_allocated; the profiler logs every CPU allocation and
    # free with its size, so the running sum of those, in time order, peaks where fn's memory does.
    with _native_stderr_silenced(), torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    allocations = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: e["ts"],
    )
    live = peak = 0
    for event in allocations:
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced():
    """Drop what C++ code writes to stderr (Kineto logs two lines per profiling session)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
