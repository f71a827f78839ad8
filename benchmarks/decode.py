"""The decode benchmark: `python -m benchmarks.decode` times one new token per sequence against a KV cache.

Every sequence holds `cache` keys; the query is one row per head (32 query heads, 8 KV heads, d 128,
Llama-3-8B's attention). Providers, interleaved in the same rounds on a CPU: ours through
flash_attention_with_kvcache with the split count chosen from the shape ("ours") and unsplit
("ours-unsplit", num_splits=1); torch's SDPA on the same cache with enable_gqa=True, under each of its
backends that runs; and the naive attention. Decoding reads the whole cache once per step and does
little arithmetic per byte, so the figure that matters is K/V bytes read per second, shown against
the device's peak memory bandwidth where it is known.
"""
import json
import pathlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention
from attention.kvcache import choose_num_splits

from .cli import int_list, name_list, parser
from .report import default_out_dir
from .run import device_slug, environment
from .timing import BUSY_SPREAD, free_memory, summarize, synchronize, times_ms

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Peak memory bandwidth in GB/s by GPU name (the vendors' data sheets), matched as substrings of
# torch.cuda.get_device_name; longer names first so "H100 PCIe" is not taken for "H100".
PEAK_BANDWIDTH_GBS = {
    "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "H200": 4800, "GH200": 4000,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
    "L40S": 864, "L4": 300, "RTX 4090": 1008, "RTX 3090": 936,
}

# (batches, cache lengths, dtypes) per (device, --quick). The CPU sizes keep the run near a minute on
# the 2-core machine; GPU sizes span issue 13's table (B 1-64, cache 1K-128K).
SIZES = {
    ("cuda", False): ([1, 8, 64], [1024, 8192, 32768, 131072], ["bf16"]),
    ("cuda", True): ([1, 8], [1024, 8192], ["bf16"]),
    ("cpu", False): ([1, 8], [1024, 8192], ["bf16", "fp32"]),
    ("cpu", True): ([1], [256], ["fp32"]),
}
# A provider whose first call takes longer is reported from that call alone ("once"), not repeated:
# on a CPU, SDPA's math backend in bf16 takes 25 s a step at B 8, cache 16K.
REPEAT_LIMIT_S = 1.0

SDPA_BACKENDS = {"cuda": {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                          "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH},
                 "cpu": {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-math": SDPBackend.MATH}}


def peak_bandwidth_gbs(device):
    """The device's peak memory bandwidth in GB/s, or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbs for key, gbs in sorted(PEAK_BANDWIDTH_GBS.items(), key=lambda kv: -len(kv[0])) if key in name),
                None)


def providers(q, k_cache, v_cache, lengths, device):
    """{name: zero-argument call}: each attends q to every sequence's cached keys."""
    calls = {
        "ours": lambda: attention.flash_attention_with_kvcache(q, k_cache, v_cache, lengths),
        "ours-unsplit": lambda: attention.flash_attention_with_kvcache(q, k_cache, v_cache, lengths, num_splits=1),
    }
    for name, backend in SDPA_BACKENDS[device.type].items():
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
        calls[name] = sdpa
    calls["naive"] = lambda: attention.naive_attention(q, k_cache, v_cache)
    return calls


def _first_call(fn, device):
    """(seconds, None) of fn's first call, or (None, why it cannot run here in one line)."""
    try:
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start, None
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        free_memory(device)
        return None, str(exc).strip().splitlines()[0][:120]


def measure_case(batch, cache, dtype, device, cpu_min_time_s, names=None):
    """Rows of one (batch, cache length, dtype) case, one per provider."""
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda heads, n: torch.randn(batch, heads, n, HEAD_DIM, generator=gen, device=device).to(DTYPES[dtype])
    q, k_cache, v_cache = make(Q_HEADS, 1), make(KV_HEADS, cache), make(KV_HEADS, cache)
    lengths = torch.full((batch,), cache, dtype=torch.int32, device=device)
    calls = providers(q, k_cache, v_cache, lengths, device)
    if names:
        calls = {name: fn for name, fn in calls.items() if name in names}
    kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
    peak = peak_bandwidth_gbs(device)
    base = dict(batch=batch, cache=cache, dtype=dtype, heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                splits=choose_num_splits(batch, KV_HEADS, cache, device), kv_bytes=kv_bytes)

    def row(name, status, ms, spread):
        gbs = kv_bytes / ms / 1e6
        return dict(base, provider=name, status=status, ms=ms, spread=spread, gbs=gbs,
                    peak_fraction=gbs / peak if peak else float("nan"))

    rows, repeated = [], {}
    with torch.no_grad():
        for name, fn in calls.items():
            seconds, problem = _first_call(fn, device)
            if problem is not None:
                rows.append(row(name, problem, float("nan"), float("nan")))
            elif seconds > REPEAT_LIMIT_S:
                rows.append(row(name, "once", seconds * 1e3, float("nan")))
            else:
                repeated[name] = fn
        timings = times_ms(list(repeated.values()), device, cpu_min_time_s) if repeated else []
    for name, (wall, _) in zip(repeated, timings):
        rows.append(row(name, "ok", *summarize(wall)))
    del q, k_cache, v_cache
    free_memory(device)
    return rows


def format_table(rows, device):
    peak = peak_bandwidth_gbs(device)
    lines = [f"decode: 1 query row per head, {Q_HEADS} query / {KV_HEADS} KV heads, d {HEAD_DIM}; K/V GB/s = bytes "
             f"of the cache read per second" + (f"; peak {peak} GB/s" if peak else "; the device's peak bandwidth "
                                                 "is not known here")]
    header = f"{'dtype':>5} {'B':>3} {'cache':>7} {'splits':>6} {'provider':>15} {'ms':>10} {'spread':>7} {'K/V GB/s':>9}"
    header += f" {'of peak':>8}" if peak else ""
    lines.append(header)
    for row in rows:
        if row["status"] not in ("ok", "once"):
            lines.append(f"{row['dtype']:>5} {row['batch']:>3} {row['cache']:>7} {row['splits']:>6} "
                         f"{row['provider']:>15}  n/a: {row['status']}")
            continue
        spread = f"{row['spread']:>6.0%}" if row["status"] == "ok" else f"{'once':>6}"
        line = (f"{row['dtype']:>5} {row['batch']:>3} {row['cache']:>7} {row['splits']:>6} {row['provider']:>15} "
                f"{row['ms']:>10.3f} {spread} {row['gbs']:>9.2f}")
        lines.append(line + (f" {row['peak_fraction']:>7.0%}" if peak else ""))
    if any(r["status"] == "once" for r in rows):
        lines.append(f"once: a first call over {REPEAT_LIMIT_S:g} s, timed alone (not repeated)")
    busy = [r for r in rows if r["status"] == "ok" and r["spread"] > BUSY_SPREAD]
    if busy:
        lines.append(f"warning: {len(busy)} timings spread over {BUSY_SPREAD:.0%} (interquartile range / median): "
                     f"the machine was busy; compare providers within a case, timed in the same rounds")
    return "\n".join(lines)


def run(device, quick=False, out_dir=None, batches=None, caches=None, dtypes=None, names=None, cpu_min_time_s=None):
    """Runs the grid, prints the table, writes decode.json and decode.txt into out_dir; returns the rows."""
    default_batches, default_caches, default_dtypes = SIZES[device.type, quick]
    cpu_min_time_s = cpu_min_time_s if cpu_min_time_s is not None else (0.02 if quick else 0.2)
    rows = []
    for dtype in dtypes or default_dtypes:
        for batch in batches or default_batches:
            for cache in caches or default_caches:
                rows += measure_case(batch, cache, dtype, device, cpu_min_time_s, names)
    table = format_table(rows, device)
    print(table)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "decode.txt").write_text(table + "\n")
        env = environment(device)
        (out_dir / "decode.json").write_text(json.dumps([dict(row, **env) for row in rows], indent=1) + "\n")
        for name in ("decode.json", "decode.txt"):
            print(f"wrote {out_dir / name}")
    return rows


def main(argv=None):
    p = parser("python -m benchmarks.decode", __doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), help="where to run (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="a smoke run: one small case")
    p.add_argument("--batches", type=int_list, help="comma list of batch sizes (default: GPU 1,8,64; CPU 1,8)")
    p.add_argument("--caches", type=int_list, help="comma list of cached keys per sequence (default: GPU "
                   "1024,8192,32768,131072; CPU 1024,8192)")
    p.add_argument("--dtypes", type=name_list, help=f"comma list of {','.join(DTYPES)} (default: GPU bf16; CPU bf16,fp32)")
    p.add_argument("--providers", type=name_list, help="comma list of ours,ours-unsplit,sdpa-*,naive (default: all)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--cpu-min-time", type=float, help="seconds of repeats per case on a CPU (default: 0.2, --quick 0.02)")
    p.add_argument("--out", type=pathlib.Path, help="output folder (default: a new benchmarks/runs/<device>-<UTC time>/)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU")
    for flag, values in (("--batches", args.batches), ("--caches", args.caches), ("--threads", [args.threads])):
        if any(v is not None and v < 1 for v in values or []):
            p.error(f"{flag} must be positive, got {values}")
    for dtype in args.dtypes or []:
        if dtype not in DTYPES:
            p.error(f"--dtypes: {dtype!r} is not one of {','.join(DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    known = ["ours", "ours-unsplit", *SDPA_BACKENDS[device.type], "naive"]
    for name in args.providers or []:
        if name not in known:
            p.error(f"--providers: {name!r} is not one of {','.join(known)}")
    if device.type == "cpu":
        print("No GPU in use: the decode benchmark runs on the CPU at small sizes.")
    run(device, args.quick, (args.out or default_out_dir(device_slug(device))).resolve(), args.batches, args.caches,
        args.dtypes, args.providers, args.cpu_min_time)


if __name__ == "__main__":
    main()
