"""Attention maps rebuilt tile by tile from q, k and lse equal the softmax computed in one piece."""
import math

import pytest
import torch

import attention
from attention import maps
from attention.models import GPT, GPTConfig
from attention.models import train as train_cli
from attention.nn import MultiHeadAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = attention.available_backends(DEVICE)
# On a GPU the kernels take fp16 (the "cuda" backend has no fp32): P then carries fp16-input rounding.
DTYPE, TOLERANCE = (torch.float16, 2e-3) if DEVICE == "cuda" else (torch.float32, 1e-5)


def softmax_reference(q, k, causal):
    """softmax(q kᵀ / sqrt(D)) in float64, bottom-right causal mask, fully masked rows all zero."""
    scores = (q.double() @ k.double().T) / math.sqrt(q.shape[-1])
    if causal:
        hidden = attention.reference.causal_mask(q.shape[0], k.shape[0], q.device)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key: -inf everywhere -> NaN -> 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_q, n_k", [(17, 17), (13, 40), (40, 13), (1, 23)])
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_map_equals_softmax(backend, n_q, n_k, causal):
    generator = torch.Generator().manual_seed(n_q * n_k)
    q, k, v = (torch.randn(1, 1, n, 20, generator=generator).to(DEVICE, DTYPE) for n in (n_q, n_k, n_k))
    _, lse = attention.flash_attention(q, k, v, causal=causal, backend=backend, return_lse=True)
    expected = softmax_reference(q[0, 0], k[0, 0], causal)
    full = maps.attention_probabilities(q[0, 0], k[0, 0], lse[0, 0], causal=causal, tile=7)
    assert full.dtype == torch.float32 and not full.isnan().any()
    torch.testing.assert_close(full.double(), expected, atol=TOLERANCE, rtol=1e-4)
    rows, cols = (n_q // 3, n_q), (n_k // 4, n_k - n_k // 5)
    window = maps.attention_probabilities(q[0, 0], k[0, 0], lse[0, 0], causal=causal, rows=rows, cols=cols, tile=5)
    torch.testing.assert_close(window.double(), expected[slice(*rows), slice(*cols)], atol=TOLERANCE, rtol=1e-4)


def test_scores_are_computed_one_bounded_tile_at_a_time(monkeypatch):
    tiles = []
    real_tile = maps.probability_tile

    def recording_tile(q_tile, k_tile, *args):
        tiles.append((q_tile.shape[0], k_tile.shape[0], args[2], args[3]))  # rows, cols, first row, first col
        return real_tile(q_tile, k_tile, *args)

    monkeypatch.setattr(maps, "probability_tile", recording_tile)
    q, k = torch.randn(50, 8), torch.randn(70, 8)
    lse = torch.logsumexp((q @ k.T) / math.sqrt(8), dim=-1)
    maps.attention_probabilities(q, k, lse, rows=(3, 47), cols=(10, 69), tile=16)
    assert max(rows for rows, *_ in tiles) <= 16 and max(cols for _, cols, *_ in tiles) <= 16
    covered = torch.zeros(50, 70, dtype=torch.int64)
    for rows, cols, first_row, first_col in tiles:
        covered[first_row : first_row + rows, first_col : first_col + cols] += 1
    expected = torch.zeros(50, 70, dtype=torch.int64)
    expected[3:47, 10:69] = 1
    assert torch.equal(covered, expected)  # the window, each entry once, nothing outside it


def test_tile_bounds():
    assert maps.tile_bounds(3, 20, 8) == [(3, 11), (11, 19), (19, 20)]
    assert maps.tile_bounds(0, 16, 8) == [(0, 8), (8, 16)]


def test_attention_probabilities_rejects_bad_windows():
    q, k, lse = torch.randn(5, 4), torch.randn(6, 4), torch.zeros(5)
    with pytest.raises(ValueError, match="rows must be a"):
        maps.attention_probabilities(q, k, lse, rows=(2, 9))
    with pytest.raises(ValueError, match="cols must be a"):
        maps.attention_probabilities(q, k, lse, cols=(4, 4))
    with pytest.raises(ValueError, match="lse must have shape"):
        maps.attention_probabilities(q, k, torch.zeros(6))
    with pytest.raises(ValueError, match="tile must be a positive int"):
        maps.attention_probabilities(q, k, lse, tile=0)


@pytest.mark.parametrize("backend", attention.available_backends("cpu"))
def test_attention_map_of_a_layer_equals_its_softmax(backend):
    torch.manual_seed(0)
    layer = MultiHeadAttention(24, 3, causal=True, backend=backend)
    x = torch.randn(2, 11, 24)
    head, example = 2, 1
    matrix = maps.attention_map(layer, layer, (x,), head=head, batch_index=example, tile=4)
    # q and k straight from the fused projection's weights: rows [q; k; v], heads in order within each.
    qkv = x[example] @ layer.qkv_proj.weight.T + layer.qkv_proj.bias
    q, k = (qkv[:, part * 24 + head * 8 : part * 24 + (head + 1) * 8] for part in (0, 1))
    torch.testing.assert_close(matrix.double(), softmax_reference(q, k, causal=True), atol=1e-5, rtol=1e-4)


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=20, n_layers=2, n_heads=2, d_model=16), backend="naive")


def test_attention_map_of_a_model_is_a_causal_distribution():
    model = tiny_gpt()
    tokens = torch.randint(0, 11, (1, 20))
    matrix = maps.attention_map(model, model.blocks[1].attn, (tokens,), head=1)
    assert torch.allclose(matrix.sum(-1), torch.ones(20), atol=1e-5)
    visible = torch.ones(20, 20, dtype=torch.bool).tril()
    assert (matrix[~visible] == 0).all() and (matrix[visible] > 0).all()


def test_attention_map_rejects_bad_arguments():
    model = tiny_gpt()
    tokens = torch.randint(0, 11, (1, 8))
    with pytest.raises(ValueError, match="head must be in"):
        maps.attention_map(model, model.blocks[0].attn, (tokens,), head=2)
    with pytest.raises(ValueError, match="batch_index must be in"):
        maps.attention_map(model, model.blocks[0].attn, (tokens,), batch_index=1)
    with pytest.raises(ValueError, match="layer did not run"):
        maps.attention_map(model, MultiHeadAttention(16, 2), (tokens,))
    with pytest.raises(TypeError, match="layer must be an attention.nn.MultiHeadAttention"):
        maps.attention_map(model, model.blocks[0].mlp, (tokens,))
    layer = MultiHeadAttention(16, 2)
    x = torch.randn(1, 5, 16)
    padding = torch.zeros(1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="key_padding_mask"):
        maps.capture_attention(layer, layer, x, key_padding_mask=padding)


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "map.png"
    matrix = torch.softmax(torch.randn(4, 6), dim=-1)
    maps.plot_attention_map(matrix, path, rows=(2, 6), cols=(0, 6), row_labels=list("abcd"), col_labels=list("uvwxyz"))
    assert path.read_bytes().startswith(b"\x89PNG")


def test_cli_draws_a_layer_of_a_trained_checkpoint(tmp_path, capsys):
    train_cli.main(
        ["--model", "encdec", "--steps", "2", "--device", "cpu", "--backends", "naive", "--out", str(tmp_path),
         "--save-models"]
    )
    checkpoint = str(tmp_path / "training_encdec.pt")
    maps.main([checkpoint, "--list-layers"])
    assert "decoder.1.cross_attn" in capsys.readouterr().out
    out = tmp_path / "cross.png"
    maps.main([checkpoint, "--layer", "decoder.1.cross_attn", "--head", "3", "--rows", "2:9", "--device", "cpu",
               "--out", str(out)])
    assert out.read_bytes().startswith(b"\x89PNG")
    assert capsys.readouterr().out == f"wrote {out.resolve()}\n"
    with pytest.raises(SystemExit):
        maps.main([checkpoint, "--layer", "decoder.9.cross_attn"])
    assert "'decoder.9.cross_attn' is not an attention layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        maps.main([checkpoint, "--layer", "decoder.1.cross_attn", "--head", "9"])
    assert capsys.readouterr().err == "python -m attention.maps: error: head must be in [0, 4), got 9\n"


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "no checkpoint file"),
    (["{not_a_checkpoint}", "--list-layers"], "is not a checkpoint of python -m attention.models.train"),
    (["{missing}", "--rows", "5"], "argument --rows: expected start:stop, e.g. 0:64, got '5'"),
    (["{missing}", "--backend", "fast"], "argument --backend: invalid choice: 'fast'"),
])
def test_cli_answers_a_bad_argument_or_file_in_one_line(tmp_path, capsys, argv, message):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    paths = {"missing": tmp_path / "missing.pt", "not_a_checkpoint": not_a_checkpoint}
    with pytest.raises(SystemExit) as exit_info:
        maps.main([arg.format(**paths) for arg in argv])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("python -m attention.maps: error: ") and message in err
    assert len(err.strip().splitlines()) == 1, err
