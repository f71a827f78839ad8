"""The benchmark suite and the long-context profiler, run at tiny CPU sizes so they never rot."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from benchmarks import __main__ as benchmark_cli
from benchmarks import profile as profile_cli
from benchmarks.flops import attention_flops, tflops_per_second
from benchmarks.profile import sweep
from benchmarks.providers import Provider, select_providers
from benchmarks.run import Config, add_comparisons, measure
from benchmarks.scaling import fit_exponent
from benchmarks.timing import peak_memory_bytes

REPO = pathlib.Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {
    "provider", "mode", "batch", "heads", "seqlen", "head_dim", "causal", "dtype", "status", "reason", "ms",
    "tflops", "peak_memory_mib", "flops", "speedup_vs_naive", "ratio_vs_sdpa_flash", "ratio_vs_sdpa_cudnn",
    "device", "device_name", "torch_version", "triton_version", "cuda_version", "memory_method", "timestamp",
}


def run_module(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path


# ---- FLOPs and the exponent fit ------------------------------------------------------------------


def test_flops_formula():
    forward = 4 * 2 * 3 * 5 * 7 * 11
    assert attention_flops(2, 3, 5, 7, 11, causal=False, mode="fwd") == forward
    assert attention_flops(2, 3, 5, 7, 11, causal=True, mode="fwd") == forward / 2
    assert attention_flops(2, 3, 5, 7, 11, causal=False, mode="bwd") == 2.5 * forward
    assert attention_flops(2, 3, 5, 7, 11, causal=True, mode="fwd+bwd") == 3.5 * forward / 2
    assert tflops_per_second(2e12, 1000.0) == pytest.approx(2.0)
    assert math.isnan(tflops_per_second(1e12, float("nan")))
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, causal=False, mode="forward")


def test_fit_exponent_recovers_the_power_of_the_upper_points():
    seqlens = [2**i for i in range(8, 16)]
    # A fixed overhead dominates small N; noise of +-2% on top. Only the upper points show N^2.
    noise = [1.02, 0.98, 1.01, 0.99, 1.02, 0.98, 1.0, 1.01]
    times = [(5e3 + 3e-3 * n**2) * e for n, e in zip(seqlens, noise)]
    assert fit_exponent(seqlens, times, upper_points=4) == pytest.approx(2.0, abs=0.05)
    assert fit_exponent(seqlens, times, upper_points=8) < 1.9  # the flat start drags a full fit down
    memory = [7.0 * n for n in seqlens]
    assert fit_exponent(seqlens, memory) == pytest.approx(1.0, abs=1e-9)
    with_gaps = memory[:-1] + [float("nan")]  # a provider's OOM point is left out
    assert fit_exponent(seqlens, with_gaps) == pytest.approx(1.0, abs=1e-9)
    assert math.isnan(fit_exponent([1024], [3.0]))
    with pytest.raises(ValueError, match="upper_points"):
        fit_exponent(seqlens, times, upper_points=1)


# ---- measuring -----------------------------------------------------------------------------------


def test_cpu_peak_memory_counts_what_a_call_allocates():
    def allocate_then_free():
        first = torch.ones(1 << 20)  # 4 MiB
        second = torch.ones(1 << 19)  # 2 MiB, while the first is alive: the peak is 6 MiB
        del first, second
        return torch.ones(1 << 18)  # 1 MiB

    peak = peak_memory_bytes(allocate_then_free, CPU)
    assert 6 * 2**20 <= peak < 6.5 * 2**20


def test_out_of_memory_becomes_a_row_status_and_ends_the_sweep():
    def forward(q, k, v, causal):
        if q.shape[2] >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return q * 1.0

    fake = Provider("fake", "runs out of memory at N >= 64", forward, lambda *_: None)
    base = Config(1, 1, 16, 8, True, "fp32")
    rows, stops = sweep([fake], ["fwd"], base, 1024, {False: 60.0, True: 60.0}, CPU, 0.0, progress=False)
    assert [(r["seqlen"], r["status"]) for r in rows] == [(16, "ok"), (32, "ok"), (64, "OOM")]
    assert math.isnan(rows[-1]["ms"]) and math.isnan(rows[-1]["tflops"])
    assert stops["fake", "fwd"] == "OOM at N=64"


def test_time_limit_and_why_not_stop_a_sweep():
    flex, naive = select_providers(["flex", "naive"])
    base = Config(1, 1, 16, 8, False, "fp32")
    rows, stops = sweep([naive, flex], ["fwd+bwd"], base, 1024, {False: 0.0, True: 0.0}, CPU, 0.0, progress=False)
    assert stops["naive", "fwd+bwd"].startswith("time limit after N=16")
    assert stops["flex", "fwd+bwd"] == "FlexAttention has no backward on CPU"
    assert [r["status"] for r in rows] == ["ok", "skipped"]


def test_a_failing_provider_is_recorded_not_raised():
    def forward(q, k, v, causal):
        raise RuntimeError("kernel exploded\nsecond line")

    broken = Provider("broken", "always fails", forward, lambda *_: None)
    result = measure(broken, Config(1, 1, 8, 8, False, "fp32"), "fwd", CPU)
    assert (result.status, result.reason) == ("error", "RuntimeError: kernel exploded")


def test_comparisons_divide_the_other_providers_time_by_this_one():
    def row(provider, ms):
        return dict(provider=provider, ms=ms, mode="fwd", batch=1, heads=1, seqlen=8, head_dim=8, causal=False,
                    dtype="fp32")

    rows = [row("naive", 10.0), row("sdpa-flash", 4.0), row("cpu", 2.0), row("sdpa-math", float("nan"))]
    add_comparisons(rows)
    assert rows[2]["speedup_vs_naive"] == 5.0 and rows[2]["ratio_vs_sdpa_flash"] == 2.0
    assert math.isnan(rows[2]["ratio_vs_sdpa_cudnn"])  # no cuDNN row on this machine
    assert math.isnan(rows[3]["speedup_vs_naive"])


@pytest.mark.parametrize(
    "main, argv, message",
    [
        (benchmark_cli.main, ["--modes", "forward"], "--modes: 'forward' is not one of fwd,bwd,fwd+bwd"),
        (benchmark_cli.main, ["--seqlens", "128,0"], "--seqlens must be positive, got [128, 0]"),
        (benchmark_cli.main, ["--dtypes", "fp8"], "--dtypes: 'fp8' is not one of fp16,bf16,fp32"),
        (benchmark_cli.main, ["--device", "cpu", "--providers", "fast"], "--providers: unknown provider(s) ['fast']"),
        (profile_cli.main, ["--fit-points", "1"], "--fit-points must be at least 2"),
    ],
)
def test_bad_arguments_are_refused_by_name(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err + str(exit_info.value.code)


# ---- the two commands, end to end ----------------------------------------------------------------


def test_benchmark_cli_quick_on_cpu(tmp_path):
    # FlexAttention's compile takes most of a minute here; test_bench_attention runs it instead.
    providers = "triton,cuda,cpu,sdpa-flash,sdpa-cudnn,sdpa-math,naive"
    stdout = run_module(
        "benchmarks", "--quick", "--device", "cpu", "--providers", providers, "--out", str(tmp_path), "--no-progress"
    )
    assert "No GPU in use" in stdout
    rows = json.loads((tmp_path / "benchmark.json").read_text())
    assert len(rows) == 7 * 2 * 2 * 3  # providers x seqlens x causal x modes
    assert all(set(row) == ROW_KEYS for row in rows)
    by_name = {}
    for row in rows:
        by_name.setdefault(row["provider"], set()).add(row["status"])
    assert by_name["naive"] == by_name["sdpa-math"] == {"ok"}
    assert by_name["sdpa-cudnn"] == by_name["triton"] == {"skipped"}
    naive = [r for r in rows if r["provider"] == "naive"]
    assert all(r["ms"] > 0 and r["peak_memory_mib"] > 0 and r["speedup_vs_naive"] == 1.0 for r in naive)
    assert {r["seqlen"] for r in naive} == {64, 128} and {r["mode"] for r in naive} == {"fwd", "bwd", "fwd+bwd"}
    for name in ("tflops_fp32.png", "memory_fp32.png"):
        assert_png(tmp_path / name)
    assert "== fwd | fp32 | causal | d=32 ==" in (tmp_path / "table.txt").read_text()


def test_profiler_on_cpu_tiny_sizes(tmp_path):
    stdout = run_module(
        "benchmarks.profile", "--device", "cpu", "--providers", "sdpa-flash,naive", "--heads", "1", "--head-dim",
        "16", "--start", "32", "--max-seqlen", "128", "--fit-points", "3", "--out", str(tmp_path), "--no-progress",
    )
    assert "small sizes" in stdout and "scaling exponents" in stdout
    rows = json.loads((tmp_path / "profile.json").read_text())
    naive = [(r["mode"], r["seqlen"]) for r in rows if r["provider"] == "naive" and r["status"] == "ok"]
    assert naive == [("fwd", 32), ("fwd", 64), ("fwd", 128), ("fwd+bwd", 32), ("fwd+bwd", 64), ("fwd+bwd", 128)]
    assert "reached the last N=128" in stdout
    for name in ("profile_time.png", "profile_memory.png"):
        assert_png(tmp_path / name)


def test_profiler_trace_names_each_call(tmp_path):
    run_module(
        "benchmarks.profile", "--device", "cpu", "--providers", "naive", "--modes", "fwd", "--heads", "1",
        "--head-dim", "16", "--trace", "64", "--out", str(tmp_path),
    )
    events = json.loads((tmp_path / "trace_N64.json").read_text())["traceEvents"]
    assert any(e.get("name") == "naive fwd N=64" for e in events)
