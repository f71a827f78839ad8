"""Training demo: each model learns its synthetic task once per attention backend, from the same seed,
the same initial weights and the same batches, so the loss curves should lie on top of each other.

    python -m attention.models.train --model all --backends naive,cpu --steps 300
    python -m attention.models.train --model gpt --long-context --context-length 16384   # on a GPU

Writes to --out (default benchmarks/results/<device>/training/): a JSON of the loss curves and speeds,
a PNG of the curves, and a markdown table of tokens/s and peak memory per backend.
"""
import argparse
import datetime
import json
import math
import platform
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

import attention

from .tasks import TASK_NAMES, make_task, save_checkpoint

WARMUP_STEPS = 2  # left out of tokens/s: the first steps compile Triton kernels and warm caches
EARLY_STEPS = 10  # where backends must agree to rounding; later, training amplifies rounding differences


def device_slug(device):
    """The results folder of a device, as the benchmarks name it: "cpu", or e.g. "nvidia-h100-80gb-hbm3"."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_cosine(step, steps):
    """Learning-rate factor: linear warm-up over the first 10% of steps, then cosine decay to 10%."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(task, backend, *, steps, lr, seed, device, autocast_dtype):
    """Train a fresh model; returns (model, run record) or (None, record with the error) when out of memory."""
    torch.manual_seed(seed)  # same initial weights for every backend
    model = task.model(backend).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps))
    batches = torch.Generator().manual_seed(seed)  # same batches for every backend
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses, best_losses, step_seconds = [], [], []
    progress = tqdm(range(steps), desc=f"{task.name} / {backend}", leave=False)
    try:
        for _ in progress:
            inputs, targets = task.make_batch(batches)
            if task.best_loss is not None:
                best_losses.append(task.best_loss(inputs, targets))
            inputs, targets = tuple(t.to(device) for t in inputs), targets.to(device)
            _synchronize(device)
            start = time.perf_counter()  # the model's step only: data generation is not timed
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = task.loss(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            _synchronize(device)
            step_seconds.append(time.perf_counter() - start)
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
    except torch.OutOfMemoryError:
        return None, {"error": "out of memory", "losses": losses}
    timed = step_seconds[WARMUP_STEPS:] or step_seconds
    record = {
        "losses": losses,
        "tokens_per_s": task.batch_size * task.positions_per_example * len(timed) / sum(timed),
        "step_ms": 1000 * sum(timed) / len(timed),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    if best_losses:
        record["best_loss"] = sum(best_losses) / len(best_losses)
    return model, record


def _format_bytes(n):
    return "not measured (CPU)" if n is None else f"{n / 2**20:,.0f} MiB"


def markdown_table(report):
    lines = [
        f"# Training demo on {report['device']}",
        "",
        f"torch {report['versions']['torch']}, {report['dtype']}, {report['steps']} steps, seed {report['seed']}. "
        "Each backend trains from the same initial weights on the same batches. tokens/s counts the sequence "
        "positions that go through attention (encoder + decoder for encdec, class token + patches for ViT) "
        f"over the model's forward, backward and optimizer step, first {WARMUP_STEPS} steps left out. "
        + ("Peak memory is torch.cuda.max_memory_allocated." if report["device_type"] == "cuda"
           else f"CPU threads: {report['cpu_threads']}. Peak memory is not measured on CPU (torch keeps no CPU "
           "allocator statistics)."),
        "",
        f"Backends round differently, so their curves agree to rounding over the first {EARLY_STEPS} steps, "
        "then drift apart the way any training run does from a perturbation; the final losses should agree "
        "within the step-to-step noise.",
        "",
        f"| model | backend | final loss (mean of last 10%) | max abs loss difference vs the first backend, "
        f"steps 1-{EARLY_STEPS} | tokens/s | step (ms) | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in report["models"].items():
        reference = None
        for backend, run in result["backends"].items():
            if "error" in run:
                lines.append(f"| {name} | {backend} | {run['error']} | | | | |")
                continue
            losses = run["losses"]
            reference = reference or losses
            early = max(abs(a - b) for a, b in zip(losses[:EARLY_STEPS], reference))
            tail = losses[-max(1, len(losses) // 10):]
            lines.append(
                f"| {name} | {backend} | {sum(tail) / len(tail):.4f} | {early:.1e} | {run['tokens_per_s']:,.0f} "
                f"| {run['step_ms']:.1f} | {_format_bytes(run['peak_memory_bytes'])} |"
            )
    return "\n".join(lines) + "\n"


def plot_losses(report, path):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    models = report["models"]
    fig = Figure(figsize=(5 * len(models), 4))
    styles = [("-", 3.0), ("--", 2.0), (":", 2.0), ("-.", 1.5)]  # thinner, broken lines on top: overlaps stay visible
    for i, (name, result) in enumerate(models.items()):
        ax = fig.add_subplot(1, len(models), i + 1)
        for (backend, run), (style, width) in zip(result["backends"].items(), styles):
            if run["losses"]:
                ax.plot(range(1, len(run["losses"]) + 1), run["losses"], style, linewidth=width, label=backend)
        best = [run["best_loss"] for run in result["backends"].values() if "best_loss" in run]
        if best:
            ax.axhline(best[0], color="gray", linewidth=1, linestyle=(0, (1, 3)), label="best possible")
        ax.set_yscale("log")
        ax.set_title(result["description"], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _versions():
    versions = {"torch": torch.__version__, "attention": attention.__version__, "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=TASK_NAMES + ("all",), default="all")
    parser.add_argument("--backends", help="comma-separated (default: every backend available on the device)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, help="peak learning rate of the warm-up + cosine schedule "
                        "(default: the task's, for its size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--long-context", action="store_true", help="GPT only, at --context-length tokens (for a GPU)")
    parser.add_argument("--context-length", type=int, default=8192)
    parser.add_argument("--digit-task", choices=("reverse", "sort"), default="reverse", help="encdec's task")
    parser.add_argument("--out", help="output folder (default: benchmarks/results/<device>/training)")
    parser.add_argument("--save-models", action="store_true", help="also save each model trained on the first backend")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    available = attention.available_backends(device)
    backends = args.backends.split(",") if args.backends else available
    for backend in backends:
        if backend not in available:
            parser.error(f"backend {backend!r} cannot run on {device.type}; available here: {', '.join(available)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    names = TASK_NAMES if args.model == "all" else (args.model,)
    if args.long_context and names != ("gpt",):
        parser.error("--long-context trains the GPT only: pass --model gpt")
    preset = "long" if args.long_context else ("gpu" if device.type == "cuda" else "cpu")
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None  # CPU: float32 throughout
    out = Path(args.out or Path("benchmarks/results") / device_slug(device) / "training")
    out.mkdir(parents=True, exist_ok=True)
    stem = "long_context" if args.long_context else "training"

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "versions": _versions(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": "bfloat16 autocast" if autocast_dtype else "float32",
        "steps": args.steps,
        "seed": args.seed,
        "models": {},
    }
    for name in names:
        options = {"gpt": {"context_length": args.context_length} if args.long_context else {},
                   "encdec": {"digit_task": args.digit_task}, "vit": {}}[name]
        task = make_task(name, preset, **options)
        lr = args.lr or task.learning_rate
        result = {"description": task.description, "lr": lr, "backends": {}}
        checkpoint = out / f"{stem}_{name}.pt" if args.save_models else None
        for backend in backends:
            model, run = train(task, backend, steps=args.steps, lr=lr, seed=args.seed, device=device,
                               autocast_dtype=autocast_dtype)
            result["backends"][backend] = run
            summary = run.get("error") or f"final loss {run['losses'][-1]:.4f}, {run['tokens_per_s']:,.0f} tokens/s"
            print(f"{name} / {backend}: {summary}")
            if checkpoint is not None and model is not None:
                save_checkpoint(checkpoint, model, name, preset, options)
                checkpoint = None  # one checkpoint per model: the first backend's
        report["models"][name] = result

    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown_table(report))
    plot_losses(report, out / f"{stem}_loss.png")
    print(markdown_table(report))
    print(f"wrote {out / stem}.json, .md and _loss.png")


if __name__ == "__main__":
    main()
