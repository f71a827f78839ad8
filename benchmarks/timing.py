"""Timing (median and spread of repeats) and peak memory of zero-argument calls, on a CUDA GPU or on the CPU."""
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
# right for calls up to about this long; slower calls (long contexts) get three timed calls instead.
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


# A timing whose interquartile range is over this fraction of its median was taken on a busy machine.
BUSY_SPREAD = 0.10


def summarize(times_ms):
    """(median, spread) of repeated times: spread = interquartile range / median, 0 for one time."""
    median = statistics.median(times_ms)
    if len(times_ms) < 2:
        return median, 0.0
    q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return median, (q3 - q1) / median


def times_ms(fns, device, cpu_min_time_s=0.2, min_rounds=5):
    """Repeated times in ms of each zero-argument call in ``fns``; call each once before (compilation).

    Returns, per call, (wall-clock times, CPU times); CPU times are None on a GPU. On a CPU the calls
    are interleaved, one round calling each once (in a rotating order), so that a busy spell of the
    machine slows every provider alike and the ratios between them hold; and the process's CPU time
    is taken too, which the time spent waiting for a core, the noise of a shared machine, leaves out.
    On a GPU each call is timed on its own (``triton.testing.do_bench``).
    """
    if device.type == "cuda":
        return [(_cuda_times_ms(fn), None) for fn in fns]
    return _cpu_interleaved_times_ms(fns, cpu_min_time_s, min_rounds)


def _cuda_event_ms(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _cuda_times_ms(fn):
    import triton.testing

    first = _cuda_event_ms(fn)
    if first <= DO_BENCH_MAX_MS:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")
    return [first, _cuda_event_ms(fn), _cuda_event_ms(fn)]


def _cpu_interleaved_times_ms(fns, min_time_s, min_rounds=5, max_rounds=50):
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    rounds = 0
    while rounds < min_rounds or (min(sum(t) for t in wall) < min_time_s * 1e3 and rounds < max_rounds):
        for i in range(len(fns)):
            j = (i + rounds) % len(fns)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[j]()
            cpu[j].append((time.process_time() - start_cpu) * 1e3)
            wall[j].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    return list(zip(wall, cpu))


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
