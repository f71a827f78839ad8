"""The demo tasks: which model learns which synthetic data, at which size, with which loss.

A task is rebuilt from its name and options alone (sizes come from a preset: "cpu" small enough for
seconds on a laptop, "gpu" larger, "long" a long-context GPT), which is all a checkpoint stores
besides the weights.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .gpt import GPT, GPTConfig
from .transformer import Transformer, TransformerConfig
from .vit import ViT, ViTConfig

TASK_NAMES = ("encdec", "gpt", "vit")
PRESETS = ("cpu", "gpu", "long")
MAX_LABELS = 64  # longer sequences are drawn with positions instead of token labels
LEARNING_RATES = {"cpu": 2e-3, "gpu": 1e-3, "long": 5e-4}  # peak rates: the bigger the model, the lower


@dataclass
class Task:
    name: str
    description: str
    model: Callable[[str], nn.Module]  # backend -> freshly initialized model
    sample: Callable  # (generator, batch_size) -> (model inputs tuple, targets)
    loss: Callable  # (model, inputs, targets) -> scalar loss
    batch_size: int
    learning_rate: float
    positions_per_example: int  # sequence positions through attention, summed over the model's stacks
    axes: Callable  # (inputs, layer name) -> ((query axis name, labels), (key axis name, labels))
    best_loss: Callable | None = None  # (inputs, targets) -> the loss of a perfect model

    def make_batch(self, generator, batch_size=None):
        return self.sample(generator, batch_size or self.batch_size)


def _token_labels(tokens, names=None):
    """One label per token (its name from ``names``, else its id), or None when too many to draw."""
    names = names or {}
    return [names.get(t, str(t)) for t in tokens.tolist()] if len(tokens) <= MAX_LABELS else None


def _cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def encdec_task(preset, digit_task="reverse"):
    length, d_model, n_heads, n_layers, batch_size = {"cpu": (12, 64, 4, 2, 32), "gpu": (32, 256, 8, 4, 128)}[preset]
    cfg = TransformerConfig(
        src_vocab_size=data.DIGIT_VOCAB_SIZE, tgt_vocab_size=data.DIGIT_VOCAB_SIZE, max_len=length + 1,
        d_model=d_model, n_heads=n_heads, n_encoder_layers=n_layers, n_decoder_layers=n_layers,
        d_ff=4 * d_model, dropout=0.0,
    )

    def sample(generator, batch_size):
        src, tgt_in, tgt_out = data.digit_task_batch(batch_size, length, digit_task, generator)
        return (src, tgt_in), tgt_out

    def axes(inputs, layer_name):
        src, tgt_in = (t[0] for t in inputs)
        source = ("source digit", _token_labels(src))
        target = ("decoder input", _token_labels(tgt_in, {data.BOS: "<s>"}))
        if layer_name.startswith("encoder"):
            return source, source
        return target, (source if "cross" in layer_name else target)

    return Task(
        name="encdec",
        description=f"encoder-decoder Transformer, {digit_task} {length} digits",
        model=lambda backend: Transformer(cfg, backend=backend),
        sample=sample,
        loss=lambda model, inputs, targets: _cross_entropy(model(*inputs), targets),
        batch_size=batch_size,
        learning_rate=LEARNING_RATES[preset],
        positions_per_example=2 * length + 1,
        axes=axes,
    )


def gpt_task(preset, context_length=8192):
    seq_len, d_model, n_heads, n_layers, batch_size = {
        "cpu": (64, 64, 4, 2, 16), "gpu": (256, 256, 8, 4, 64), "long": (context_length, 512, 8, 4, 1),
    }[preset]
    cfg = GPTConfig(vocab_size=16, block_size=seq_len, n_layers=n_layers, n_heads=n_heads, d_model=d_model)
    grammar = data.MarkovGrammar(vocab_size=cfg.vocab_size, branching=3, lag=2, seed=0)

    def sample(generator, batch_size):
        tokens = grammar.sample(batch_size, seq_len + 1, generator)
        return (tokens[:, :-1],), tokens[:, 1:]

    def axes(inputs, layer_name):
        tokens = ("token", _token_labels(inputs[0][0]))
        return tokens, tokens

    return Task(
        name="gpt",
        description=f"GPT, lag-2 Markov language, {seq_len} tokens",
        model=lambda backend: GPT(cfg, backend=backend),
        sample=sample,
        loss=lambda model, inputs, targets: _cross_entropy(model(*inputs)[0], targets),
        batch_size=batch_size,
        learning_rate=LEARNING_RATES[preset],
        positions_per_example=seq_len,
        axes=axes,
        best_loss=lambda inputs, targets: grammar.best_loss(torch.cat([inputs[0], targets[:, -1:]], dim=1).cpu()),
    )


def vit_task(preset):
    image_size, d_model, n_heads, n_layers, batch_size = {
        "cpu": (16, 64, 4, 2, 64), "gpu": (32, 256, 8, 4, 256),
    }[preset]
    cfg = ViTConfig(
        image_size=image_size, patch_size=4, in_channels=1, num_classes=len(data.BAR_ORIENTATIONS),
        d_model=d_model, n_layers=n_layers, n_heads=n_heads,
    )

    def sample(generator, batch_size):
        images, labels = data.bar_images(batch_size, image_size, generator)
        return (images,), labels

    def axes(inputs, layer_name):
        tokens = ("class token, then patches", None)
        return tokens, tokens

    return Task(
        name="vit",
        description=f"ViT, bar orientation in {image_size}x{image_size} images",
        model=lambda backend: ViT(cfg, backend=backend),
        sample=sample,
        loss=lambda model, inputs, targets: F.cross_entropy(model(*inputs), targets),
        batch_size=batch_size,
        learning_rate=LEARNING_RATES[preset],
        positions_per_example=cfg.n_patches + 1,
        axes=axes,
    )


def make_task(name, preset="cpu", **options):
    """The task ``name`` at size ``preset``; options: digit_task (encdec), context_length (gpt, "long")."""
    if name not in TASK_NAMES:
        raise ValueError(f"task must be one of {TASK_NAMES}, got {name!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if preset == "long" and name != "gpt":
        raise ValueError(f"the long-context preset is for the gpt task, got {name!r}")
    return {"encdec": encdec_task, "gpt": gpt_task, "vit": vit_task}[name](preset, **options)


def save_checkpoint(path, model, name, preset, options):
    torch.save({"task": name, "preset": preset, "options": options, "state_dict": model.state_dict()}, path)


def load_checkpoint(path, backend="auto"):
    """(task, model) from a file written by save_checkpoint, weights loaded, on the CPU."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    task = make_task(saved["task"], saved["preset"], **saved["options"])
    model = task.model(backend)
    model.load_state_dict(saved["state_dict"])
    return task, model
