"""Turning result rows into a text table, a JSON file and PNG plots."""
import datetime
import json
import math
import pathlib
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import matplotlib.ticker  # noqa: E402

from .cases import CASES, DROPOUT_P, DROPOUT_SEED, SOFTCAP  # noqa: E402
from .flops import MODES  # noqa: E402
from .providers import OUR_BACKENDS  # noqa: E402
from .run import COMPARISONS  # noqa: E402

# Where a run writes by default, a new folder each time (git-ignored); benchmarks/results/ holds the
# committed results, written only when --out names them.
RUNS_DIR = pathlib.Path(__file__).resolve().parent / "runs"
GROUP_KEYS = ("case", "mode", "dtype", "causal", "head_dim")

# What a reader of the gqa and varlen sections must know to compare their rows.
CASE_NOTES = {
    "gqa": "gqa: ours and naive read k, v with the KV heads; sdpa-* get them expanded to the query heads "
           "(repeat_interleave, copied before timing), sdpa-*-gqa grouped with enable_gqa=True",
    "varlen": "varlen: a batch of B sequences of mixed lengths (listed), the longest N; <ours>-varlen packed, "
              "<ours> dense with key_padding_mask, sdpa-* and naive on the padded batch with a mask; "
              "FLOP/s count the real tokens only, the same work for every provider",
    "window": "window: a sliding window (L, 0) with causal, (L, L) without; ours and naive given window=, sdpa-* the "
              "same band as a bool attn_mask (N, N), made before timing; FLOP/s count the visible (query, key) pairs",
    "softcap": f"softcap: ours and naive with softcap={SOFTCAP:g}; torch's SDPA has no softcap",
    "alibi": "alibi: ours and naive with alibi_slopes 2^(-8h/H), h = 1..H; sdpa-* the float attn_mask "
             "-slope * |i - j| (1, H, N, N) in the input dtype, -inf above the diagonal with causal, made before timing",
    "dropout": f"dropout: p = {DROPOUT_P:g}; ours with dropout_seed={DROPOUT_SEED} (the keep-mask drawn inside), sdpa-* "
               "with dropout_p (torch's own random mask), naive given the keep-mask of that seed, made before timing",
}


def _fmt(value, spec):
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _percent(fraction):
    return f"{min(100 * fraction, 999):.0f}%"


def _group_title(case, mode, dtype, causal, head_dim):
    title = f"{mode} | {dtype} | {'causal' if causal else 'non-causal'} | d={head_dim}"
    return title if case == "grid" else f"{case} | {title}"


def _heads(row):
    """"32" or, with grouped-query heads, "32/8" (query / KV heads)."""
    kv_heads = row.get("kv_heads") or row["heads"]
    return f"{row['heads']}/{kv_heads}" if kv_heads != row["heads"] else str(row["heads"])


def default_out_dir(name, runs_dir=RUNS_DIR):
    """A new folder for one run: runs_dir/<name>-<UTC date and time>."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return runs_dir / f"{name}-{stamp}"


def _comparison_columns(rows):
    """The x <provider> columns worth a column: those whose provider has a time in this run."""
    timed = {r["provider"] for r in rows if r["status"] == "ok"}
    return [(column, other) for column, other in COMPARISONS.items() if other in timed]


def format_table(rows):
    """One section per (mode, dtype, causal, head_dim); the providers that did not run are listed after.

    Times are medians with their spread (± half the interquartile range, relative to the median); on a
    CPU, the fraction of the machine's peak is given, computed as the header says.
    """
    comparisons = _comparison_columns(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    giga = bool(ok) and max(r["tflops"] for r in ok) < 1.0  # CPU figures read better in GFLOP/s
    with_peak = any(math.isfinite(r.get("peak_gflops") or math.nan) for r in ok)
    columns = ["N", "B", "H", "provider", "ms", "±", "GFLOP/s" if giga else "TFLOP/s"]
    widths = [7, 4, 6, 19, 11, 6, 10]
    if with_peak:
        columns, widths = columns + ["% peak"], widths + [8]
    columns += ["peak MiB"] + [f"x {other}" for _, other in comparisons]
    widths += [10] + [max(9, len(other) + 4) for _, other in comparisons]
    header = "".join(f"{c:>{w}}" for c, w in zip(columns, widths))
    groups = defaultdict(list)
    not_run = defaultdict(set)
    for row in rows:
        if row["status"] == "skipped":
            not_run[row["provider"]].add(row["reason"])
        else:
            groups[tuple(row.get(k, "grid") if k == "case" else row[k] for k in GROUP_KEYS)].append(row)
    lines = []
    if comparisons:
        lines.append("x <provider>: that provider's time / this one's (above 1: this one is faster)")
    if with_peak:
        lines.append(f"% peak: of {next(r['peak_how'] for r in ok if r.get('peak_how'))}")
    cases = sorted({key[0] for key in groups}, key=_case_order)
    lines += [CASE_NOTES[case] for case in cases if case in CASE_NOTES]
    for key in sorted(groups, key=lambda k: (_case_order(k[0]), MODES.index(k[1]), *k[2:])):
        lines += ["", f"== {_group_title(*key)} ==", header]
        for row in sorted(groups[key], key=lambda r: r["seqlen"]):
            if row["status"] == "ok":
                flops = row["tflops"] * (1e3 if giga else 1.0)
                cells = [_fmt(row["ms"], ".3f"), _percent(row["spread"] / 2), _fmt(flops, ".4g")]
                if with_peak:
                    peak = row.get("peak_gflops_bf16", row["peak_gflops"]) if row["dtype"] == "bf16" else row["peak_gflops"]
                    cells.append(_fmt(100 * row["tflops"] * 1e3 / peak, ".0f"))
                cells.append(_fmt(row["peak_memory_mib"], ".1f"))
                cells += [_fmt(row[column], ".2f") for column, _ in comparisons]
            else:  # "OOM" or "error": no numbers, the status in the time column
                cells = [row["status"]] + [""] * (len(columns) - 5)
            values = (row["seqlen"], row["batch"], _heads(row), row["provider"], *cells)
            lines.append("".join(f"{v:>{w}}" for v, w in zip(values, widths)))
        lengths = {r["seqlen"]: r["lengths"] for r in groups[key] if r.get("lengths")}
        lines += [f"  lengths at N={n}: {', '.join(map(str, lengths[n]))}" for n in sorted(lengths)]
        windows = sorted({r["window"] for r in groups[key] if r.get("window") is not None})
        lines += [f"  window L = {window}: ({window}, {0 if key[3] else window})" for window in windows]
    if not_run:
        lines += ["", "not run:"]
        lines += [f"  {name}: {' | '.join(sorted(reasons))}" for name, reasons in not_run.items()]
    errors = sorted({f"  {r['provider']} {r['mode']} {_case_prefix(r)}N={r['seqlen']}: {r['reason']}"
                     for r in rows if r["status"] == "error"})
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)


def _case_order(case):
    return CASES.index(case) if case in CASES else len(CASES)


def _case_prefix(row):
    case = row.get("case", "grid")
    return "" if case == "grid" else f"{case} "


def _json_safe(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(rows, path):
    """The rows as a JSON list, one row a line; nan and inf become null (JSON has no NaN)."""
    lines = [json.dumps({k: _json_safe(v) for k, v in row.items()}) for row in rows]
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(lines) + "\n]\n")


def seqlen_label(n):
    """512, 1K, 16K, 1M: the way sequence lengths are spoken of."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def seqlen_axis(ax, seqlens):
    """A log2 x axis with a labelled tick at each measured sequence length."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(seqlens), [seqlen_label(n) for n in sorted(seqlens)], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("sequence length N")


def log_y_axis(ax):
    """A log y axis labelled 1, 2, 5, 10, 20, 50 (not 2x10^1)."""
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2, 5)))
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="both", labelsize=7)


MARKERS = "osD^v<>p*h"
DASHES = [(5, 2), (2, 2), (6, 2, 2, 2), (1, 1), (8, 3)]


def _style(provider, providers):
    # Ours solid and thick, baselines dashed and thinner, each with its own marker and dash pattern:
    # two providers that measure the same stay visible as two lines, one over the other.
    i = sorted(providers).index(provider)
    color = plt.get_cmap("tab10")(i % 10)
    common = dict(color=color, marker=MARKERS[i % len(MARKERS)], markersize=5, alpha=0.85)
    if provider.split("-")[0] in OUR_BACKENDS:  # "cpu-varlen" is ours too
        return dict(common, linestyle="-", linewidth=2.4, zorder=3)
    return dict(common, linestyle=(0, DASHES[i % len(DASHES)]), linewidth=1.4, markerfacecolor="none", zorder=2)


def held_fixed(rows):
    """What a sweep over N holds fixed, for a plot title: "B·N = 2048 tokens, H·d = 512" or "B = 1, H = 8"."""
    parts = []
    tokens = {r["batch"] * r["seqlen"] for r in rows}
    batches = {r["batch"] for r in rows}
    if len(tokens) == 1 and len(batches) > 1:
        parts.append(f"B·N = {tokens.pop()} tokens")
    elif len(batches) == 1:
        parts.append(f"B = {batches.pop()}")
    hidden = {r["heads"] * r["head_dim"] for r in rows}
    heads = {_heads(r) for r in rows}
    if len(heads) == 1:
        parts.append(f"H = {heads.pop()}")
    elif len(hidden) == 1:
        parts.append(f"H·d = {hidden.pop()}")
    return ", ".join(parts)


def plot_metric(rows, metric, ylabel, title, path, log_y=False, scale=1.0, spread=False):
    """A grid of panels (rows: modes; columns: head_dim x causal), one line per provider, scale * y vs seqlen.

    ``spread``: error bars of ± half the timing's interquartile range (relative), where it has one,
    cut at 0 and at twice the value, with the y axis fitted to the values (not to the bars).
    """
    ok = [r for r in rows if r["status"] == "ok" and math.isfinite(r[metric])]
    if not ok:
        return None
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    columns = sorted({(r["head_dim"], r["causal"]) for r in ok})
    providers = sorted({r["provider"] for r in ok})
    fig, axes = plt.subplots(
        len(modes), len(columns), figsize=(4.2 * len(columns), 3.2 * len(modes)), squeeze=False
    )
    for i, mode in enumerate(modes):
        for j, (head_dim, causal) in enumerate(columns):
            ax = axes[i][j]
            for provider in providers:
                points = sorted(
                    (r["seqlen"], scale * r[metric], scale * r[metric] * min(1.0, r.get("spread", 0.0) / 2))
                    for r in ok
                    if (r["provider"], r["mode"], r["head_dim"], r["causal"]) == (provider, mode, head_dim, causal)
                )
                if points:
                    x, y, y_err = zip(*points)
                    ax.errorbar(x, y, yerr=y_err if spread else None, capsize=2, label=provider,
                                **_style(provider, providers))
            seqlen_axis(ax, {r["seqlen"] for r in ok})
            if log_y:
                log_y_axis(ax)
            elif spread:
                panel = [scale * r[metric] for r in ok if (r["mode"], r["head_dim"], r["causal"]) == (mode, head_dim, causal)]
                ax.set_ylim(0, 1.2 * max(panel))
            ax.set_title(f"{mode}, d={head_dim}, {'causal' if causal else 'non-causal'}", fontsize=9)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(title, y=1.09)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_results(rows, out_dir):
    """TFLOP/s (GFLOP/s on a CPU; error bars: the timing's spread) vs N and peak memory vs N (log-log),
    one pair of PNGs per case and dtype (named ``<metric>_<dtype>.png`` for the grid,
    ``<metric>_<dtype>_<case>.png`` for the others) that has more than one N; returns the paths."""
    device_name = rows[0]["device_name"] if rows else ""
    paths = []
    for case, dtype in sorted({(r.get("case", "grid"), r["dtype"]) for r in rows}, key=lambda c: (_case_order(c[0]), c[1])):
        subset = [r for r in rows if (r.get("case", "grid"), r["dtype"]) == (case, dtype)]
        if len({r["seqlen"] for r in subset}) < 2:  # one point per line: the table says it all (a CPU's one size)
            continue
        fixed = held_fixed(subset)
        what, suffix = ("", "") if case == "grid" else (f"{case}, ", f"_{case}")
        giga = max((r["tflops"] for r in subset if r["status"] == "ok"), default=0.0) < 1.0
        paths.append(plot_metric(
            subset, "tflops", "GFLOP/s" if giga else "TFLOP/s",
            f"attention throughput, {what}{dtype}, {fixed}\n{device_name}",
            out_dir / f"{'gflops' if giga else 'tflops'}_{dtype}{suffix}.png", scale=1e3 if giga else 1.0, spread=True,
        ))
        paths.append(plot_metric(
            subset, "peak_memory_mib", "peak memory (MiB)", f"attention peak memory, {what}{dtype}, {fixed}\n{device_name}",
            out_dir / f"memory_{dtype}{suffix}.png", log_y=True,
        ))
    return [p for p in paths if p is not None]
