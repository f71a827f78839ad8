"""The benchmark suite and the long-context profiler, run at tiny CPU sizes so they never rot."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import attention
from attention.reference import naive_attention_varlen
from benchmarks import __main__ as benchmark_cli
from benchmarks import callgrind as callgrind_cli
from benchmarks import cpu_targets as targets_cli
from benchmarks import decode as decode_cli
from benchmarks import profile as profile_cli
from benchmarks.callgrind import instruction_count as callgrind_instructions
from benchmarks.flops import attention_flops, tflops_per_second, visible_pairs, windowed_attention_flops
from benchmarks.profile import sweep
from benchmarks.providers import Provider, case_providers, ours_provider, select_providers
from benchmarks.report import RUNS_DIR, default_out_dir, format_table, held_fixed, plot_results
from benchmarks.cases import (
    DROPOUT_P,
    DROPOUT_SEED,
    OPTIONS,
    SOFTCAP,
    Config,
    alibi_slopes,
    case_inputs,
    key_padding_mask,
    varlen_lengths,
    window_mask,
)
from benchmarks.run import add_comparisons, busy_warning, cpu_bf16_speedup, cpu_peak, measure, run_benchmarks
from benchmarks.scaling import fit_exponent
from benchmarks.timing import peak_memory_bytes, summarize, times_ms

REPO = pathlib.Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {
    "provider", "mode", "case", "kv_heads", "lengths", "option", "window", "batch", "heads", "seqlen", "head_dim", "causal", "dtype", "status", "reason", "ms",
    "spread", "cpu_ms", "cpu_spread", "repeats", "tflops", "peak_memory_mib", "flops", "speedup_vs_naive",
    "ratio_vs_sdpa_flash", "ratio_vs_sdpa_cudnn", "device", "device_name", "peak_gflops", "peak_gflops_bf16", "peak_how",
    "cpu_isa", "torch_version",
    "triton_version", "cuda_version", "memory_method", "timestamp",
}


def run_module(*args, expect_ok=True):
    """``python -m args`` in a child whose output is not a terminal; stdout (and stderr when expect_ok=False)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if not expect_ok:
        return done
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


@pytest.mark.parametrize("n_q, n_k, window", [(16, 16, (4, 0)), (16, 16, (-1, -1)), (16, 16, (-1, 0)), (5, 9, (2, 1)),
                                             (9, 5, (0, 0)), (9, 5, (-1, 0)), (7, 7, (3, 3)), (8, 8, (100, 0))])
def test_window_flops_count_the_visible_pairs(n_q, n_k, window):
    pairs = int(window_mask(n_q, n_k, window, CPU).sum())
    assert visible_pairs(n_q, n_k, window) == pairs
    assert windowed_attention_flops(2, 3, n_q, n_k, 8, window, "fwd+bwd") == 3.5 * 4 * 2 * 3 * pairs * 8


def test_a_fixed_window_does_work_linear_in_n():
    config = Config(1, 4, 1024, 64, True, "fp32", option="window", window=256)
    assert config.case == "window" and config.window_bounds == (256, 0)
    # query i sees min(i, 256) + 1 keys
    assert config.flops("fwd") == 4 * 4 * 64 * (sum(range(1, 257)) + (1024 - 256) * 257)
    assert Config(1, 4, 64, 8, False, "fp32", option="window", window=3).window_bounds == (3, 3)
    doubled = [visible_pairs(n, n, (256, 0)) for n in (1 << 14, 1 << 15)]
    assert doubled[1] / doubled[0] == pytest.approx(2.0, abs=0.01)
    softcap = Config(1, 4, 1024, 64, True, "fp32", option="softcap")
    assert softcap.flops("fwd") == attention_flops(1, 4, 1024, 1024, 64, True, "fwd")
    with pytest.raises(ValueError, match="window"):
        Config(1, 4, 64, 8, True, "fp32", option="softcap", window=3)
    with pytest.raises(ValueError, match="window"):
        Config(1, 4, 64, 8, True, "fp32", option="window")
    with pytest.raises(ValueError, match="option"):
        Config(1, 4, 64, 8, True, "fp32", option="rope")


def test_varlen_flops_count_each_sequence_at_its_own_length():
    config = Config(3, 2, 16, 8, True, "fp32", lengths=(16, 5, 9))
    assert config.case == "varlen"
    per_sequence = [attention_flops(1, 2, n, n, 8, causal=True, mode="fwd+bwd") for n in (16, 5, 9)]
    assert config.flops("fwd+bwd") == sum(per_sequence) == 3.5 * 4 * 2 * 8 * (16**2 + 5**2 + 9**2) / 2
    # grouped-query heads do the work of the query heads: k and v are read, not computed, per group
    gqa = Config(2, 8, 16, 8, False, "fp32", kv_heads=2)
    assert gqa.case == "gqa" and gqa.flops("fwd") == attention_flops(2, 8, 16, 16, 8, causal=False, mode="fwd")
    assert Config(2, 8, 16, 8, False, "fp32").kv_heads == 8


def test_varlen_lengths_are_mixed_fixed_and_as_long_as_n_at_most():
    lengths = varlen_lengths(16, 512)
    assert lengths == varlen_lengths(16, 512) and len(lengths) == 16
    assert max(lengths) == 512 and min(lengths) >= 64 and len(set(lengths)) > 8


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


def test_an_error_in_a_varlen_case_becomes_a_row_status():
    def forward(q, k, v, causal, cu_seqlens, max_seqlen):
        assert q.shape == (5 + 16, 2, 8) and cu_seqlens.tolist() == [0, 5, 21] and max_seqlen == 16
        raise RuntimeError("cpu backend: cu_seqlens are not implemented yet")

    broken = Provider("broken-varlen", "packed, always fails", forward, lambda *_: None, "packed")
    result = measure(broken, Config(2, 2, 16, 8, True, "fp32", lengths=(5, 16)), "fwd+bwd", CPU)
    assert (result.status, result.reason) == ("error", "RuntimeError: cpu backend: cu_seqlens are not implemented yet")


def _real_rows(out, lengths):
    """The rows of a padded (B, H, N, D) output that belong to a sequence, packed as (total, H, D)."""
    return torch.cat([out[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_provider_of_a_case_computes_the_same_attention(causal):
    """The expanded k, v, the packed and padded batches and SDPA's masks mean what the case says: same
    draws (same seed), same attention, for the SDPA and naive providers that time them."""
    gqa = Config(2, 4, 16, 8, causal, "fp32", kv_heads=2)
    torch.manual_seed(0)
    q, k, v, _ = case_inputs(gqa, "dense", CPU, requires_grad=False)
    expected = attention.naive_attention(q.double(), k.double(), v.double(), causal=causal)
    checked = set()
    for provider in case_providers("gqa"):
        if provider.why_not(CPU, torch.float32, 8, causal, "fwd") or provider.name in ("cpu", "cuda", "triton"):
            continue  # our backends are tested against the reference in tests/test_attention.py
        torch.manual_seed(0)
        *inputs, extra = case_inputs(gqa, provider.form, CPU, requires_grad=False)
        torch.testing.assert_close(provider.forward(*inputs, causal, **extra).double(), expected, atol=1e-5, rtol=1e-5)
        checked.add(provider.name)
    assert checked == {"sdpa-flash", "sdpa-flash-gqa", "sdpa-math", "sdpa-math-gqa", "naive"}

    lengths = (5, 16, 1)
    varlen = Config(3, 2, 16, 8, causal, "fp32", lengths=lengths)
    torch.manual_seed(0)
    q, k, v, extra = case_inputs(varlen, "packed", CPU, requires_grad=False)
    expected = naive_attention_varlen(q.double(), k.double(), v.double(), extra["cu_seqlens"], extra["cu_seqlens"],
                                      causal=causal)
    checked = set()
    for provider in case_providers("varlen"):
        if provider.why_not(CPU, torch.float32, 8, causal, "fwd") or provider.family in ("cpu", "cuda", "triton"):
            continue
        torch.manual_seed(0)
        *inputs, extra = case_inputs(varlen, provider.form, CPU, requires_grad=False)
        out = provider.forward(*inputs, causal, **extra)
        torch.testing.assert_close(_real_rows(out, lengths).double(), expected, atol=1e-5, rtol=1e-5)
        checked.add(provider.name)
    assert checked == {"sdpa-flash", "sdpa-math", "naive"}
    mask = key_padding_mask(lengths, 16, CPU)
    assert mask.sum(1).tolist() == list(lengths) and mask[:, 0].all()


def _option_outputs(config, names, backend):
    """Each named provider's output on the option case of ``config``, from the same draws (seed 0);
    "ours" is flash_attention through ``backend``."""
    providers = {p.name: p for p in case_providers(config.case)}
    providers["ours"] = ours_provider(backend, config.case)
    outputs = {}
    for name in names:
        torch.manual_seed(0)
        q, k, v, extra = case_inputs(config, providers[name].form, CPU, requires_grad=False)
        if config.option == "softcap":  # scores of tens, where the cap changes them
            q = q * 20
        outputs[name] = providers[name].forward(q, k, v, config.causal, **extra)
    return outputs


@pytest.mark.parametrize("backend", ["naive", "cpu"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("option", OPTIONS)
def test_the_option_cases_give_every_provider_the_same_attention(option, causal, backend):
    """SDPA's mask or bias, the naive attention's arguments and ours (the API's reference path and the
    C++ kernels) mean the same option: a wrong equivalence (a band off by one, a bias of the wrong sign
    or head order, a mask not of our seed) fails here. The option must change the output, or the
    comparison would prove nothing."""
    reason = ours_provider(backend, option).why_not(CPU, torch.float32, 8, causal, "fwd")
    if reason:
        pytest.skip(reason)
    config = Config(2, 3, 24, 8, causal, "fp32", option=option, window=5 if option == "window" else None)
    sdpa = () if option in ("softcap", "dropout") else ("sdpa-flash", "sdpa-math")
    outputs = _option_outputs(config, ("ours", "naive", *sdpa), backend)
    for name in ("naive", *sdpa):
        torch.testing.assert_close(outputs[name], outputs["ours"], atol=1e-5, rtol=1e-5, msg=f"{option}: {name}")
    torch.manual_seed(0)
    q, k, v, _ = case_inputs(config, "dense", CPU, requires_grad=False)
    plain = attention.naive_attention(q * 20 if option == "softcap" else q, k, v, causal=causal)
    assert (outputs["ours"] - plain).abs().max() > 1e-3


def test_the_option_arguments_are_the_ones_the_notes_describe():
    config = Config(2, 4, 16, 8, True, "fp32", option="alibi")
    *_, ours = case_inputs(config, "option-ours", CPU, requires_grad=False)
    torch.testing.assert_close(ours["alibi_slopes"], torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    *_, sdpa = case_inputs(config, "option-sdpa", CPU, requires_grad=False)
    bias = sdpa["attn_mask"]
    assert bias.shape == (1, 4, 16, 16) and bias[0, 1, 5, 2] == -3 * 2.0**-4 and bias[0, 0, 2, 5] == float("-inf")
    window = Config(1, 1, 16, 8, True, "fp32", option="window", window=3)
    *_, sdpa = case_inputs(window, "option-sdpa", CPU, requires_grad=False)
    assert sdpa["attn_mask"][9].nonzero().flatten().tolist() == [6, 7, 8, 9]
    assert case_inputs(window, "option-ours", CPU, requires_grad=False)[3] == {"window": (3, 0)}
    dropout = Config(1, 2, 16, 8, False, "fp32", option="dropout")
    assert case_inputs(dropout, "option-ours", CPU, requires_grad=False)[3] == {
        "dropout_p": DROPOUT_P, "dropout_seed": DROPOUT_SEED}
    assert case_inputs(dropout, "option-sdpa", CPU, requires_grad=False)[3] == {"dropout_p": DROPOUT_P}
    softcap = Config(1, 2, 16, 8, False, "fp32", option="softcap")
    assert case_inputs(softcap, "option-naive", CPU, requires_grad=False)[3] == {"softcap": SOFTCAP}
    with pytest.raises(ValueError, match="no softcap"):
        case_inputs(softcap, "option-sdpa", CPU, requires_grad=False)


def test_option_rows_run_and_report_sane_numbers():
    """Each option, fwd and fwd+bwd, timed interleaved: ours (the C++ kernels), SDPA given the
    equivalent, naive; times, FLOP/s and peak memory positive, SDPA not run on softcap, and the
    window scored on its visible pairs."""
    providers = {option: select_providers(["cpu", "sdpa-math", "naive"], option) for option in OPTIONS}
    cases = [(Config(1, 2, 32, 8, True, "fp32", option=option, window=6 if option == "window" else None), mode)
             for option in OPTIONS for mode in ("fwd", "fwd+bwd")]
    rows = run_benchmarks(providers, cases, CPU, cpu_min_time_s=0.0, progress=False)
    assert len(rows) == 3 * len(cases)
    for row in rows:
        if row["case"] == "softcap" and row["provider"] == "sdpa-math":
            assert row["status"] == "skipped" and "no softcap" in row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["ms"] > 0 and row["tflops"] > 0 and row["peak_memory_mib"] > 0 and row["repeats"] >= 5
        assert math.isfinite(row["spread"]) and row["speedup_vs_naive"] > 0
    window = next(r for r in rows if r["case"] == "window" and r["mode"] == "fwd")
    assert window["window"] == 6 and window["flops"] == 4 * 2 * 8 * visible_pairs(32, 32, (6, 0))
    table = format_table(rows)
    assert "== window | fwd+bwd | fp32 | causal | d=8 ==" in table and "window L = 6: (6, 0)" in table
    assert "sdpa-* the same band as a bool attn_mask" in table


def test_a_provider_name_selects_its_variants_in_the_option_cases():
    assert [p.name for p in select_providers(["cpu", "sdpa-flash"], "varlen")] == ["cpu-varlen", "cpu", "sdpa-flash"]
    assert [p.name for p in select_providers(["cpu", "sdpa-flash"], "gqa")] == ["cpu", "sdpa-flash", "sdpa-flash-gqa"]
    assert [p.name for p in select_providers(["cpu-varlen"], "grid")] == []
    assert [p.form for p in select_providers(["naive"], "varlen")] == ["padded"]
    with pytest.raises(ValueError, match="unknown provider"):
        select_providers(["sdpa-flash-varlen"], "varlen")


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
        (benchmark_cli.main, ["--seqlens", "1k"], "argument --seqlens: expected a comma list of integers, got '1k'"),
        (benchmark_cli.main, ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (benchmark_cli.main, ["--cases", "grid,mqa"],
         "--cases: 'mqa' is not one of grid,gqa,varlen,window,softcap,alibi,dropout,options,decode"),
        (decode_cli.main, ["--caches", "0"], "--caches must be positive, got [0]"),
        (decode_cli.main, ["--device", "cpu", "--providers", "sdpa-cudnn"], "--providers: 'sdpa-cudnn' is not one of"),
        (benchmark_cli.main, ["--window", "0"], "--window must be positive, got [0]"),
        (benchmark_cli.main, ["--gqa-heads", "8,3"], "--gqa-heads: want query heads,KV heads with the first a multiple"),
        (profile_cli.main, ["--fit-points", "1"], "--fit-points must be at least 2"),
        (profile_cli.main, ["--heads", "0"], "--heads must be positive, got 0"),
        (profile_cli.main, ["--window", "-1"], "--window must be positive, got -1"),
        (profile_cli.main, ["--modes", "fwd,back"], "--modes: 'back' is not one of fwd,bwd,fwd+bwd"),
        (targets_cli.main, ["--threads", "0"], "--threads must be positive, got [0]"),
        (targets_cli.main, ["--dtypes", "fp64"], "--dtypes: 'fp64' is not one of fp16,bf16,fp32"),
        (callgrind_cli.main, ["--op", "both"], "argument --op: invalid choice: 'both'"),
        (callgrind_cli.main, ["--seqlen", "0"], "--seqlen must be positive, got 0"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("module, default", [
    ("benchmarks", "(default: grid fwd,bwd,fwd+bwd, the others fwd,fwd+bwd)"),
    ("benchmarks.profile", "(default: GPU 16, CPU 4)"),
    ("benchmarks.cpu_targets", "(default: 1,2)"),
    ("benchmarks.callgrind", "(default: 512)"),
    ("benchmarks.decode", "(default: GPU 1,8,64; CPU 1,8)"),
])
def test_help_shows_how_to_run_and_the_defaults(module, default):
    stdout = " ".join(run_module(module, "--help").split())
    assert stdout.startswith(f"usage: python -m {module} ") and default in stdout


# ---- measuring on a busy machine -----------------------------------------------------------------


def test_summarize_gives_the_median_and_the_interquartile_range_over_it():
    assert summarize([10.0, 11.0, 12.0, 13.0, 30.0]) == (12.0, pytest.approx((13.0 - 11.0) / 12.0))
    assert summarize([4.0]) == (4.0, 0.0)


def test_cpu_timing_interleaves_the_calls_in_rotating_order():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b"), lambda: calls.append("c")]
    (wall_a, cpu_a), *_ = times_ms(fns, CPU, cpu_min_time_s=0.0, min_rounds=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert len(wall_a) == len(cpu_a) == 3 and all(t >= 0 for t in wall_a + cpu_a)


def test_busy_warning_comes_from_the_spread():
    quiet = [dict(status="ok", spread=0.02), dict(status="skipped", spread=math.nan)]
    assert busy_warning(quiet) is None
    warning = busy_warning(quiet + [dict(status="ok", spread=0.4)])
    assert warning.startswith("warning: 1 of 2 timings spread over 10%") and "worst 40%" in warning


def test_cpu_peak_is_cores_times_clock_times_flop_per_cycle():
    peak, how = cpu_peak(2, {"cpu MHz": "2500.000", "flags": "fpu sse2 avx avx2 fma"})
    assert peak == pytest.approx(2 * 2.5 * 32)
    assert how == "2 cores x 2.50 GHz x 32 FLOP/cycle (AVX2 FMA, fp32) = 160.0 GFLOP/s"
    assert math.isnan(cpu_peak(1, {})[0])
    bf16_cpu = {"cpu MHz": "2000.000", "flags": "avx2 fma avx512f avx512_bf16"}
    peak, how = cpu_peak(1, bf16_cpu)
    assert peak == pytest.approx(2.0 * 64)
    assert how.endswith("= 128.0 GFLOP/s; bf16 (vdpbf16ps, 2 products a lane): 256.0 GFLOP/s")
    assert cpu_bf16_speedup(bf16_cpu) == 2 and cpu_bf16_speedup({"flags": "avx2 fma avx512f"}) == 1


def test_table_has_no_column_for_a_provider_that_did_not_run():
    def row(provider, status, ms):
        return dict(provider=provider, status=status, reason="cannot" if status != "ok" else "", ms=ms, spread=0.1,
                    tflops=1e-3 if ms else math.nan, peak_memory_mib=1.0, mode="fwd", batch=1, heads=1, seqlen=64,
                    head_dim=8, causal=False, dtype="fp32", peak_gflops=100.0, peak_how="1 core x ...")

    rows = [row("cpu", "ok", 1.0), row("sdpa-flash", "ok", 2.0), row("sdpa-cudnn", "skipped", math.nan)]
    add_comparisons(rows)
    table = format_table(rows)
    header = next(line for line in table.splitlines() if line.split()[:1] == ["N"])
    assert header.split() == ["N", "B", "H", "provider", "ms", "±", "GFLOP/s", "%", "peak", "peak", "MiB",
                              "x", "sdpa-flash"]
    assert "nan" not in table and "sdpa-cudnn: cannot" in table
    assert "       1" in next(line for line in table.splitlines() if " cpu " in line)  # 1 GFLOP/s is 1% of 100


def test_each_case_with_more_than_one_n_gets_plots_of_its_own(tmp_path):
    def row(case, provider, seqlen, ms):
        return dict(case=case, provider=provider, status="ok", ms=ms, spread=0.05, tflops=1e-3 / ms,
                    peak_memory_mib=seqlen / 64, mode="fwd", batch=1, heads=8, kv_heads=2 if case == "gqa" else 8,
                    seqlen=seqlen, head_dim=16, causal=True, dtype="fp32", device_name="test CPU")

    rows = [row("gqa", p, n, n / 64) for p in ("cpu", "sdpa-flash-gqa") for n in (64, 128)]
    rows += [row("varlen", "cpu-varlen", 64, 1.0)]
    paths = plot_results(rows, tmp_path)
    assert paths == [tmp_path / "gflops_fp32_gqa.png", tmp_path / "memory_fp32_gqa.png"]
    for path in paths:
        assert_png(path)
    assert held_fixed(rows[:4]) == "B = 1, H = 8/2"


def test_plot_title_says_what_is_held_fixed():
    def row(batch, seqlen, heads, head_dim):
        return dict(batch=batch, seqlen=seqlen, heads=heads, head_dim=head_dim)

    assert held_fixed([row(4, 512, 8, 64), row(2, 1024, 4, 128)]) == "B·N = 2048 tokens, H·d = 512"
    assert held_fixed([row(1, 512, 2, 64), row(1, 1024, 2, 128)]) == "B = 1, H = 2"


def test_default_output_is_a_new_folder_of_runs_not_the_committed_results(tmp_path):
    first = default_out_dir("cpu", runs_dir=tmp_path)
    assert first.parent == tmp_path and first.name.startswith("cpu-20")
    assert RUNS_DIR.name == "runs" and "results" not in str(RUNS_DIR)
    assert "benchmarks/runs/" in (REPO / ".gitignore").read_text()


def test_callgrind_count_reads_the_summary_line(tmp_path):
    out = tmp_path / "callgrind.out"
    out.write_text("version: 1\nevents: Ir\nfn=(1) f\n1 5\nsummary: 123456\n")
    assert callgrind_instructions(out) == 123456
    out.write_text("events: Ir\n")
    with pytest.raises(ValueError, match="no summary line"):
        callgrind_instructions(out)


# ---- the two commands, end to end ----------------------------------------------------------------


def test_benchmark_cli_quick_on_cpu(tmp_path):
    # FlexAttention's compile takes most of a minute here; test_bench_attention runs it instead.
    providers = "triton,cuda,cpu,sdpa-flash,sdpa-cudnn,sdpa-math,naive"
    done = run_module(
        "benchmarks", "--quick", "--device", "cpu", "--providers", providers, "--out", str(tmp_path), expect_ok=False
    )
    assert done.returncode == 0, done.stderr
    stdout = done.stdout
    assert "No GPU in use" in stdout
    # not a terminal: one progress line per case (grid: 2 seqlens x 2 masks x 3 modes; gqa: causal only x
    # fwd, fwd+bwd; varlen: 2 masks x fwd, fwd+bwd; the four options: causal only x fwd, fwd+bwd), no bar
    progress = [line for line in done.stderr.splitlines() if line.startswith(("fwd ", "bwd ", "fwd+bwd "))]
    assert len(progress) == 12 + 2 + 4 + 4 * 2 and "\r" not in done.stderr
    assert "cpu " in progress[0] and " ms ±" in progress[0]
    assert sum(" gqa B=1 H=8/2 N=64 d=32" in line for line in progress) == 2
    wrote = [line.removeprefix("wrote ") for line in stdout.splitlines() if line.startswith("wrote ")]
    assert {pathlib.Path(p) for p in wrote} == {tmp_path.resolve() / name for name in (
        "benchmark.json", "table.txt", "gflops_fp32.png", "memory_fp32.png", "decode.json", "decode.txt")}
    # (gqa, varlen: one N, no plot)
    all_rows = json.loads((tmp_path / "benchmark.json").read_text())
    assert all(set(row) == ROW_KEYS for row in all_rows)
    # each case: its providers (the named ones and their variants) x its cases
    assert [sum(r["case"] == case for r in all_rows) for case in ("grid", "gqa", "varlen", *OPTIONS)] == [
        7 * 12, 10 * 2, 10 * 4, *[7 * 2] * 4]
    rows = [r for r in all_rows if r["case"] == "grid"]
    by_name = {}
    for row in rows:
        by_name.setdefault(row["provider"], set()).add(row["status"])
    assert by_name["naive"] == by_name["sdpa-math"] == {"ok"}
    assert by_name["sdpa-cudnn"] == by_name["triton"] == {"skipped"}
    naive = [r for r in rows if r["provider"] == "naive"]
    assert all(r["ms"] > 0 and r["peak_memory_mib"] > 0 and r["speedup_vs_naive"] == 1.0 for r in naive)
    assert {r["seqlen"] for r in naive} == {64, 128} and {r["mode"] for r in naive} == {"fwd", "bwd", "fwd+bwd"}
    for name in ("gflops_fp32.png", "memory_fp32.png"):
        assert_png(tmp_path / name)
    table = (tmp_path / "table.txt").read_text()
    assert "== fwd | fp32 | causal | d=32 ==" in table
    assert "x sdpa-cudnn" not in table and "x sdpa-flash" in table  # no column of a provider that cannot run here

    # issue 10's cases: the rows say their shape, the baselines ran, and FLOPs count real tokens only
    gqa = [r for r in all_rows if r["case"] == "gqa"]
    assert {(r["heads"], r["kv_heads"], r["lengths"], r["causal"]) for r in gqa} == {(8, 2, None, True)}
    varlen = [r for r in all_rows if r["case"] == "varlen"]
    lengths = varlen[0]["lengths"]
    assert {tuple(r["lengths"]) for r in varlen} == {tuple(lengths)} and max(lengths) == 64 and len(lengths) == 4
    for row in varlen:
        real = sum(attention_flops(1, row["heads"], n, n, 32, row["causal"], row["mode"]) for n in lengths)
        assert row["flops"] == real < attention_flops(4, row["heads"], 64, 64, 32, row["causal"], row["mode"])
    for case_rows, names in ((gqa, ("sdpa-flash", "sdpa-flash-gqa", "sdpa-math", "naive")),
                             (varlen, ("sdpa-flash", "sdpa-math", "naive"))):
        ran = {r["provider"] for r in case_rows if r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0}
        assert ran >= set(names)
        assert {r["status"] for r in case_rows if r["provider"].startswith("triton")} == {"skipped"}
        assert all(r["status"] in ("ok", "error") for r in case_rows if r["provider"].startswith("cpu"))
    naive_varlen = next(r for r in varlen if r["provider"] == "naive" and r["mode"] == "fwd" and not r["causal"])
    flash_varlen = next(r for r in varlen if r["provider"] == "sdpa-flash" and r["mode"] == "fwd" and not r["causal"])
    assert naive_varlen["ratio_vs_sdpa_flash"] == pytest.approx(flash_varlen["ms"] / naive_varlen["ms"])
    assert "== gqa | fwd | fp32 | causal | d=32 ==" in table and "== varlen | fwd+bwd | fp32 | non-causal | d=32 ==" in table
    assert f"lengths at N=64: {', '.join(map(str, lengths))}" in table and "FLOP/s count the real tokens only" in table
    assert any(line.split()[2:4] == ["8/2", "sdpa-flash-gqa"] for line in table.splitlines())

    # issue 11's options, in the default cases: the baselines ran, SDPA where it has an equivalent
    options = [r for r in all_rows if r["case"] in OPTIONS]
    ran = {(r["case"], r["provider"]) for r in options if r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0}
    assert ran >= {(option, name) for option in OPTIONS for name in ("cpu", "naive")}
    assert ran >= {(option, "sdpa-math") for option in ("window", "alibi", "dropout")}
    assert {r["status"] for r in options if r["case"] == "softcap" and r["provider"].startswith("sdpa")} == {"skipped"}
    assert {r["window"] for r in options if r["case"] == "window"} == {16}
    assert "== window | fwd | fp32 | causal | d=32 ==" in table and "== dropout | fwd+bwd | fp32 | causal | d=32 ==" in table


    # issue 13's decode table, last: every provider computed, ours split as the shape says
    decode_rows = json.loads((tmp_path / "decode.json").read_text())
    assert {r["provider"] for r in decode_rows if r["status"] == "ok"} >= {"ours", "ours-unsplit", "sdpa-math", "naive"}
    assert all(r["gbs"] > 0 and r["kv_bytes"] == 2 * 8 * 256 * 128 * 4 for r in decode_rows if r["status"] == "ok")
    assert "decode: 1 query row per head, 32 query / 8 KV heads" in (tmp_path / "decode.txt").read_text()


def test_decode_providers_compute_the_same_attention():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 32, 1, 128, generator=gen)
    k, v = (torch.randn(2, 8, 40, 128, generator=gen) for _ in range(2))
    calls = decode_cli.providers(q, k, v, torch.full((2,), 40, dtype=torch.int32), torch.device("cpu"))
    reference = attention.naive_attention(q.double(), k.double(), v.double()).float()
    for name, call in calls.items():
        with torch.no_grad():
            torch.testing.assert_close(call(), reference, atol=1e-4, rtol=1e-4, msg=name)


def test_a_slow_decode_provider_is_timed_once(monkeypatch):
    monkeypatch.setattr(decode_cli, "REPEAT_LIMIT_S", 0.0)
    rows = decode_cli.measure_case(1, 32, "fp32", torch.device("cpu"), 0.0, names=["ours", "naive"])
    assert {r["status"] for r in rows} == {"once"} and all(r["ms"] > 0 and r["gbs"] > 0 for r in rows)
    assert "once: a first call over 0 s" in decode_cli.format_table(rows, torch.device("cpu"))


def test_decode_bandwidth_peaks_by_gpu_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert decode_cli.peak_bandwidth_gbs(torch.device("cuda")) == 2000
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert decode_cli.peak_bandwidth_gbs(torch.device("cuda")) == 3350
    assert decode_cli.peak_bandwidth_gbs(torch.device("cpu")) is None


def test_the_options_case_set_stands_for_its_cases():
    assert benchmark_cli.parse_args(["--cases", "options,window"]).cases == list(OPTIONS)
    assert benchmark_cli.parse_args([]).cases == ["grid", "gqa", "varlen", *OPTIONS, "decode"]


def test_profiler_on_cpu_tiny_sizes(tmp_path):
    stdout = run_module(
        "benchmarks.profile", "--device", "cpu", "--providers", "sdpa-flash,naive", "--heads", "1", "--head-dim",
        "16", "--start", "32", "--max-seqlen", "128", "--fit-points", "3", "--time-limit", "60", "--out", str(tmp_path),
        "--no-progress",
    )
    assert "small sizes" in stdout and "scaling exponents" in stdout
    rows = json.loads((tmp_path / "profile.json").read_text())
    naive = [(r["mode"], r["seqlen"]) for r in rows if r["provider"] == "naive" and r["status"] == "ok"]
    assert naive == [("fwd", 32), ("fwd", 64), ("fwd", 128), ("fwd+bwd", 32), ("fwd+bwd", 64), ("fwd+bwd", 128)]
    assert "reached the last N=128" in stdout
    for name in ("profile_time.png", "profile_memory.png"):
        assert_png(tmp_path / name)


def test_profiler_with_a_window_fits_the_exponents(tmp_path):
    stdout = run_module(
        "benchmarks.profile", "--device", "cpu", "--window", "8", "--providers", "naive,sdpa-math", "--modes", "fwd",
        "--heads", "1", "--head-dim", "16", "--start", "32", "--max-seqlen", "256", "--fit-points", "3",
        "--time-limit", "60", "--out", str(tmp_path), "--no-progress",
    )
    assert "B=1 H=1 d=16 fp32 causal window (8, 0)" in stdout
    rows = json.loads((tmp_path / "profile.json").read_text())
    assert {(r["case"], r["window"]) for r in rows} == {("window", 8)}
    assert [r["seqlen"] for r in rows if r["provider"] == "naive"] == [32, 64, 128, 256]
    fits = {line.split()[1]: line.split()[2:5] for line in stdout.splitlines() if line.startswith("     fwd")
            and "reached the last N=256" in line}
    assert set(fits) == {"naive", "sdpa-math"}
    for time_exponent, _memory, work_exponent in fits.values():
        assert math.isfinite(float(time_exponent))
        # N·9 - 36 pairs: the work of a fixed window is linear in N, whatever these two providers spend
        assert float(work_exponent) == pytest.approx(1.0, abs=0.05)


def test_profiler_trace_names_each_call(tmp_path):
    run_module(
        "benchmarks.profile", "--device", "cpu", "--providers", "naive", "--modes", "fwd", "--heads", "1",
        "--head-dim", "16", "--trace", "64", "--out", str(tmp_path),
    )
    events = json.loads((tmp_path / "trace_N64.json").read_text())["traceEvents"]
    assert any(e.get("name") == "naive fwd N=64" for e in events)


def test_cpu_targets_grid_tiny(tmp_path):
    stdout = run_module(
        "benchmarks.cpu_targets", "--seqlens", "64", "--head-dims", "16", "--dtypes", "fp32", "--causal", "yes",
        "--threads", "1", "--repeats", "2", "--out", str(tmp_path),
    )
    assert "peak at 1 thread(s): 1 cores x " in stdout
    lines = [line for line in stdout.splitlines() if line.startswith("| 1 | fp32 | 64 | 16 | causal |")]
    assert [line.split(" | ")[5] for line in lines] == ["fwd", "fwd+bwd"]
    rows = json.loads((tmp_path / "cpu_targets.json").read_text())
    assert [(r["provider"], r["mode"], r["status"], r["repeats"]) for r in rows] == [
        ("cpu", "fwd", "ok", 2), ("sdpa-flash", "fwd", "ok", 2), ("cpu", "fwd+bwd", "ok", 2),
        ("sdpa-flash", "fwd+bwd", "ok", 2),
    ]
    assert f"wrote {tmp_path.resolve() / 'cpu_targets.json'}" in stdout
