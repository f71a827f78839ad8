"""Attention-weight maps of one head of one layer, computed tile by tile from q, k and the saved lse.

The fused kernels never materialize the (Nq, Nk) probability matrix. To draw it, capture the layer's
q and k during a forward, get each row's log-sum-exp from ``flash_attention(..., return_lse=True)``
(O(N) memory), then rebuild only the requested window, one tile at a time:

    P[i, j] = exp(scale · q_i · k_j - lse_i)   (0 where the causal mask hides key j)

Memory is the window drawn plus one tile, so rows of a 64K-token map cost 64K floats each.

CLI (on a checkpoint from ``python -m attention.models.train --save-models``):
    python -m attention.maps CHECKPOINT --list-layers
    python -m attention.maps CHECKPOINT --layer decoder.1.cross_attn --head 0 [--rows 0:64] [--cols 0:64]
"""
import argparse
import inspect
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .api import flash_attention
from .backends import BACKENDS, available_backends
from .nn import MultiHeadAttention


def tile_bounds(start, stop, tile):
    """[start, stop) cut into consecutive (lo, hi) pieces of at most ``tile``."""
    return [(lo, min(lo + tile, stop)) for lo in range(start, stop, tile)]


def probability_tile(q_tile, k_tile, lse_tile, scale, first_row, first_col, causal_offset):
    """P for q_tile (r, D) against k_tile (c, D): float32 (r, c). ``causal_offset`` = Nk - Nq, or None
    when not causal; the tile's top-left entry is (first_row, first_col) of the full matrix."""
    scores = scale * (q_tile.float() @ k_tile.float().T)
    probs = torch.exp(scores - lse_tile[:, None])
    if causal_offset is None:
        return probs
    rows = torch.arange(first_row, first_row + q_tile.shape[0], device=q_tile.device)[:, None]
    cols = torch.arange(first_col, first_col + k_tile.shape[0], device=q_tile.device)[None, :]
    # Fully masked rows have lse = -inf and exp(+inf) here: the fill turns those to 0 as well.
    return probs.masked_fill(cols > rows + causal_offset, 0.0)


def _window(bounds, length, name):
    start, stop = (0, length) if bounds is None else bounds
    if not 0 <= start < stop <= length:
        raise ValueError(f"{name} must be a (start, stop) window with 0 <= start < stop <= {length}, got {bounds}")
    return start, stop


def attention_probabilities(q, k, lse, *, causal=False, softmax_scale=None, rows=None, cols=None, tile=256):
    """The window P[rows[0]:rows[1], cols[0]:cols[1]] of one head's attention weights, float32.

    q (Nq, D), k (Nk, D), lse (Nq,) float32 from ``flash_attention(..., return_lse=True)``. ``causal``
    is bottom-right aligned as in ``flash_attention``. ``rows`` / ``cols`` default to everything;
    scores are computed ``tile`` x ``tile`` at a time.
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must be (N, head_dim) with one head_dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    if tuple(lse.shape) != (q.shape[0],):
        raise ValueError(f"lse must have shape (Nq,) = ({q.shape[0]},), got {tuple(lse.shape)}")
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    n_q, n_k = q.shape[0], k.shape[0]
    row_start, row_stop = _window(rows, n_q, "rows")
    col_start, col_stop = _window(cols, n_k, "cols")
    scale = 1.0 / math.sqrt(q.shape[1]) if softmax_scale is None else softmax_scale
    causal_offset = n_k - n_q if causal else None
    out = torch.empty(row_stop - row_start, col_stop - col_start, dtype=torch.float32, device=q.device)
    for r0, r1 in tile_bounds(row_start, row_stop, tile):
        lse_tile = lse[r0:r1].float()
        for c0, c1 in tile_bounds(col_start, col_stop, tile):
            out[r0 - row_start : r1 - row_start, c0 - col_start : c1 - col_start] = probability_tile(
                q[r0:r1], k[c0:c1], lse_tile, scale, r0, c0, causal_offset
            )
    return out


@dataclass
class CapturedAttention:
    """What one MultiHeadAttention computed in a forward: q, k, v as (B, H, N, head_dim)."""

    q: Tensor
    k: Tensor
    v: Tensor


@torch.no_grad()
def capture_attention(model: nn.Module, layer: MultiHeadAttention, *inputs, **kwargs) -> CapturedAttention:
    """Run ``model(*inputs, **kwargs)`` and return the q, k, v of ``layer``'s (last) call in it.

    A pre-hook records the layer's arguments; q, k, v are then recomputed with the layer's own
    projections, so the layer needs no capture code of its own.
    """
    if not isinstance(layer, MultiHeadAttention):
        raise TypeError(f"layer must be an attention.nn.MultiHeadAttention, got {type(layer).__name__}")
    calls = []
    handle = layer.register_forward_pre_hook(lambda _, args, kw: calls.append((args, kw)), with_kwargs=True)
    try:
        model(*inputs, **kwargs)
    finally:
        handle.remove()
    if not calls:
        raise ValueError("layer did not run during model(*inputs): is it a submodule of model?")
    args, kw = calls[-1]
    bound = inspect.signature(layer.forward).bind(*args, **kw).arguments
    if bound.get("key_padding_mask") is not None:
        raise ValueError("the layer was called with a key_padding_mask: its map would need the mask in the lse")
    return CapturedAttention(*layer.project(bound["x"], bound.get("context")))


def attention_map(model, layer, inputs, *, head=0, batch_index=0, rows=None, cols=None, tile=256):
    """Attention weights (float32, rows x cols window) of ``head`` in ``layer`` for example ``batch_index``
    of ``model(*inputs)``; the lse comes from the layer's own backend."""
    captured = capture_attention(model, layer, *inputs)
    batch, heads = captured.q.shape[:2]
    if not 0 <= head < heads:
        raise ValueError(f"head must be in [0, {heads}), got {head}")
    if not 0 <= batch_index < batch:
        raise ValueError(f"batch_index must be in [0, {batch}), got {batch_index}")
    pick = (slice(batch_index, batch_index + 1), slice(head, head + 1))
    q, k, v = captured.q[pick], captured.k[pick], captured.v[pick]  # (1, 1, N, head_dim)
    with torch.no_grad():
        _, lse = flash_attention(q, k, v, causal=layer.causal, backend=layer.backend, return_lse=True)
    return attention_probabilities(q[0, 0], k[0, 0], lse[0, 0], causal=layer.causal, rows=rows, cols=cols, tile=tile)


def plot_attention_map(matrix, path, *, rows=None, cols=None, row_labels=None, col_labels=None, title=None,
                       xlabel="key", ylabel="query"):
    """Write ``matrix`` (a window from ``attention_probabilities``) as a PNG heatmap.

    ``rows`` / ``cols`` are the window's (start, stop), so the axes show true positions; labels (one
    per row / column, e.g. tokens) replace the positions when given.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    matrix = matrix.detach().float().cpu().numpy()
    row_start = 0 if rows is None else rows[0]
    col_start = 0 if cols is None else cols[0]
    n_rows, n_cols = matrix.shape
    size = min(12.0, 3.0 + 0.25 * max(n_rows, n_cols))
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    extent = (col_start - 0.5, col_start + n_cols - 0.5, row_start + n_rows - 0.5, row_start - 0.5)
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, extent=extent, interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax, label="attention weight")
    if row_labels is not None:
        ax.set_yticks(range(row_start, row_start + n_rows), labels=row_labels)
    if col_labels is not None:
        ax.set_xticks(range(col_start, col_start + n_cols), labels=col_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parse_window(text):
    start, sep, stop = text.partition(":")
    try:
        return int(start), int(stop)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected start:stop, e.g. 0:64, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """Answers a bad argument with one line, not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _load(path, backend):
    from .models.tasks import load_checkpoint

    if not Path(path).is_file():
        raise ValueError(f"no checkpoint file {path!r} (python -m attention.models.train --save-models writes them)")
    try:
        return load_checkpoint(path, backend=backend)
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path!r} is not a checkpoint of python -m attention.models.train "
                         f"(torch.load: {type(exc).__name__})") from None


def main(argv=None):
    parser = _Parser(
        prog="python -m attention.maps", description="Draw one head's attention weights from a trained checkpoint.",
        epilog="example: python -m attention.maps training_encdec.pt --layer decoder.1.cross_attn --head 3 --rows 0:16",
    )
    parser.add_argument("checkpoint", help="a .pt file written by python -m attention.models.train --save-models")
    parser.add_argument("--list-layers", action="store_true", help="print the attention layers' names and exit")
    parser.add_argument("--layer", help="module name of a MultiHeadAttention, e.g. decoder.1.cross_attn "
                                        "(default: list the layers)")
    parser.add_argument("--head", type=int, default=0, help="head index (default: 0)")
    parser.add_argument("--rows", type=_parse_window, help="query window start:stop (default: all)")
    parser.add_argument("--cols", type=_parse_window, help="key window start:stop (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example the model reads (default: 0)")
    parser.add_argument("--tile", type=int, default=256, help="scores computed tile x tile at a time (default: 256)")
    parser.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                        help="attention backend for the forward and the lse (default: auto)")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="where the model runs (default: cuda when available, else cpu)")
    parser.add_argument("--out", help="PNG path (default: next to the checkpoint)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    if args.backend != "auto" and args.backend not in available_backends(device):
        parser.error(f"--backend {args.backend} cannot run on {device} here; available: {available_backends(device)}")
    try:
        out = _draw(args, device)
    except (ValueError, TypeError, OSError) as exc:  # a bad window, head, layer or path: one line, no traceback
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    if out is not None:
        print(f"wrote {Path(out).resolve()}")


def _draw(args, device):
    """Lists the layers, or draws the map and returns the PNG's path."""
    task, model = _load(args.checkpoint, args.backend)
    model = model.to(device).eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    if args.list_layers or args.layer is None:
        for name, layer in layers.items():
            print(f"{name}  ({layer.n_heads} heads, causal={layer.causal}, cross={layer.cross})")
        return None
    if args.layer not in layers:
        raise ValueError(f"--layer {args.layer!r} is not an attention layer; choose one of: {', '.join(layers)}")
    inputs, _ = task.make_batch(torch.Generator().manual_seed(args.seed), batch_size=1)
    inputs = tuple(t.to(device) for t in inputs)
    matrix = attention_map(model, layers[args.layer], inputs, head=args.head, rows=args.rows, cols=args.cols,
                           tile=args.tile)
    (row_axis, row_labels), (col_axis, col_labels) = task.axes(inputs, args.layer)
    row_window = args.rows or (0, matrix.shape[0])
    col_window = args.cols or (0, matrix.shape[1])
    checkpoint = Path(args.checkpoint)
    out = args.out or str(checkpoint.with_name(f"{checkpoint.stem}_{args.layer}_head{args.head}.png"))
    plot_attention_map(
        matrix, out, rows=row_window, cols=col_window,
        row_labels=row_labels[slice(*row_window)] if row_labels else None,
        col_labels=col_labels[slice(*col_window)] if col_labels else None,
        title=f"{task.description}\n{args.layer}, head {args.head}", xlabel=col_axis, ylabel=row_axis,
    )
    return out


if __name__ == "__main__":
    main()
