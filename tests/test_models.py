"""The attention modules and the reference models on every backend the device has.

- MultiHeadAttention against torch.nn.MultiheadAttention with the same weights;
- each model's outputs and parameter gradients agree across backends (fp32 on CPU; on a GPU, bf16
  held to the 2x / 3x rule against an fp32 naive run);
- what the models promise: causality, greedy decoding, padding, tied weights, the synthetic data;
- the training demo CLI end to end at a few steps.
"""
import copy
import json
import math

import pytest
import torch
from torch import nn

import attention
import attention.nn as attn_nn
from attention.models import GPT, GPTConfig, Transformer, TransformerConfig, ViT, ViTConfig, data, set_backend
from attention.models import train as train_cli
from attention.nn import LearnedPositionalEncoding, MultiHeadAttention, SinusoidalPositionalEncoding

# fp32 agreement is checked on the CPU backends (exact fp32 math); GPU kernels, TF32-class in fp32 and
# fp16/bf16-only for "cuda", are checked in bf16 against the 2x / 3x rule.
CPU_BACKENDS = attention.available_backends("cpu")
GPU_FUSED_BACKENDS = (
    [b for b in attention.available_backends("cuda") if b != "naive"] if torch.cuda.is_available() else []
)
FP32_RELATIVE_TOLERANCE = 1e-4


def assert_close_relative(actual, expected, tolerance=FP32_RELATIVE_TOLERANCE, what=""):
    error = (actual.double() - expected.double()).abs().max().item()
    bound = tolerance * expected.abs().max().item() + 1e-6
    assert error <= bound, f"{what}: max abs error {error:.3e} > {bound:.3e}"


# ---- MultiHeadAttention -----------------------------------------------------------------------------


def torch_twin(layer: MultiHeadAttention) -> nn.MultiheadAttention:
    """torch's MultiheadAttention with our layer's weights: its packed in_proj is our [q; k; v] layout."""
    twin = nn.MultiheadAttention(layer.d_model, layer.n_heads, batch_first=True)
    with torch.no_grad():
        if layer.cross:
            twin.in_proj_weight.copy_(torch.cat([layer.q_proj.weight, layer.kv_proj.weight]))
            twin.in_proj_bias.copy_(torch.cat([layer.q_proj.bias, layer.kv_proj.bias]))
        else:
            twin.in_proj_weight.copy_(layer.qkv_proj.weight)
            twin.in_proj_bias.copy_(layer.qkv_proj.bias)
        twin.out_proj.weight.copy_(layer.out_proj.weight)
        twin.out_proj.bias.copy_(layer.out_proj.bias)
    return twin


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "causal, cross, padded",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True), (True, False, True),
     (False, True, True)],
)
def test_multi_head_attention_matches_torch(backend, causal, cross, padded):
    torch.manual_seed(0)
    d_model, n_heads, n_q = 36, 3, 13  # head_dim 12
    n_k = 17 if cross else n_q
    layer = MultiHeadAttention(d_model, n_heads, causal=causal, cross=cross, backend=backend)
    twin = torch_twin(layer)
    x = torch.randn(2, n_q, d_model, requires_grad=True)
    context = torch.randn(2, n_k, d_model) if cross else None
    padding = torch.zeros(2, n_k, dtype=torch.bool)
    padding[1, -4:] = True  # pad the end of the second example, as right-padded batches do
    padding = padding if padded else None

    out = layer(x, context, key_padding_mask=padding)
    keys = x if context is None else context
    future = torch.ones(n_q, n_k, dtype=torch.bool).triu(1) if causal else None
    expected, _ = twin(x, keys, keys, key_padding_mask=padding, attn_mask=future, need_weights=False)
    assert_close_relative(out, expected, what="output")
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    assert_close_relative(grad, expected_grad, what="grad x")


def test_self_attention_hands_strided_views_to_the_kernel(monkeypatch):
    seen = []

    def recording_flash_attention(q, k, v, **kwargs):
        seen.append((q, k, v))
        return attention.flash_attention(q, k, v, **kwargs)

    monkeypatch.setattr(attn_nn, "flash_attention", recording_flash_attention)
    layer = MultiHeadAttention(32, 4, backend="naive")
    layer(torch.randn(2, 5, 32))
    (q, k, v), = seen
    assert q.shape == (2, 4, 5, 8) and q.stride(-1) == 1 and not q.is_contiguous()
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()


def test_multi_head_attention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="d_model .* divisible by n_heads"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="backend must be"):
        MultiHeadAttention(32, 4, backend="flash")
    layer = MultiHeadAttention(32, 4)
    with pytest.raises(ValueError, match="backend must be"):
        layer.backend = "cudnn"
    with pytest.raises(ValueError, match="context must be None"):
        layer(torch.randn(1, 3, 32), torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="context must be given"):
        MultiHeadAttention(32, 4, cross=True)(torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        layer(torch.randn(1, 3, 32), key_padding_mask=torch.zeros(1, 3))


def test_positional_encodings():
    sinusoidal = SinusoidalPositionalEncoding(d_model=7, max_len=10)
    encoded = sinusoidal(torch.zeros(1, 10, 7))[0]
    position, pair = 3, 2  # dims 2*pair and 2*pair + 1 share one frequency
    angle = position / 10000 ** (2 * pair / 7)
    assert encoded[position, 2 * pair].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert encoded[position, 2 * pair + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    learned = LearnedPositionalEncoding(d_model=4, max_len=5)
    x = torch.randn(2, 5, 4)
    assert torch.equal(learned(x), x + learned.embedding.weight)
    with pytest.raises(ValueError, match="sequence length 11 exceeds the positional encoding's max_len 10"):
        sinusoidal(torch.zeros(1, 11, 7))
    with pytest.raises(ValueError, match="sequence length 6 exceeds the positional encoding's max_len 5"):
        learned(torch.zeros(1, 6, 4))


# ---- the models -------------------------------------------------------------------------------------

def tiny_encdec(backend="naive", norm_first=False, tie_embeddings=True):
    cfg = TransformerConfig(
        src_vocab_size=12, tgt_vocab_size=12 if tie_embeddings else 9, max_len=32, d_model=24, n_heads=4,
        n_encoder_layers=1, n_decoder_layers=2, d_ff=32, dropout=0.0, norm_first=norm_first,
        tie_embeddings=tie_embeddings,
    )
    return Transformer(cfg, backend=backend)


def tiny_gpt(backend="naive"):
    return GPT(GPTConfig(vocab_size=17, block_size=16, n_layers=2, n_heads=2, d_model=24), backend=backend)


def tiny_vit(backend="naive"):
    cfg = ViTConfig(image_size=12, patch_size=4, in_channels=2, num_classes=5, d_model=24, n_layers=1, n_heads=3)
    return ViT(cfg, backend=backend)


def model_and_inputs(name, generator):
    """(model, inputs, loss of the output): Nq != Nk in the enc-dec (13 source, 7 target tokens)."""
    if name.startswith("encdec"):
        norm_first = name == "encdec-prenorm"
        model = tiny_encdec(norm_first=norm_first, tie_embeddings=not norm_first)
        src = torch.randint(0, 12, (2, 13), generator=generator)
        tgt = torch.randint(0, model.cfg.tgt_vocab_size, (2, 7), generator=generator)
        return model, (src, tgt), lambda logits: logits.logsumexp(-1).sum()
    if name == "gpt":
        return tiny_gpt(), (torch.randint(0, 17, (2, 11), generator=generator),), lambda out: out[0].logsumexp(-1).sum()
    return tiny_vit(), (torch.randn(3, 2, 12, 12, generator=generator),), lambda logits: logits.logsumexp(-1).sum()


MODEL_NAMES = ["encdec-postnorm", "encdec-prenorm", "gpt", "vit"]


def run(model, inputs, loss_of):
    model.zero_grad(set_to_none=True)
    output = model(*inputs)
    loss_of(output).backward()
    logits = output[0] if isinstance(output, tuple) else output
    return logits.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "naive"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_agree_across_backends_fp32(name, backend):
    torch.manual_seed(0)
    model, inputs, loss_of = model_and_inputs(name, torch.Generator().manual_seed(1))
    reference, reference_grads = run(model, inputs, loss_of)
    ours, grads = run(set_backend(copy.deepcopy(model), backend), inputs, loss_of)
    assert_close_relative(ours, reference, what=f"{name} output")
    for param, grad in grads.items():
        assert_close_relative(grad, reference_grads[param], what=f"{name} grad {param}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 model runs are checked on a GPU")
@pytest.mark.parametrize("backend", GPU_FUSED_BACKENDS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_bf16_within_twice_torch_error(name, backend):
    torch.manual_seed(0)
    model, inputs, loss_of = model_and_inputs(name, torch.Generator().manual_seed(1))
    model = model.to("cuda")
    inputs = tuple(t.to("cuda").bfloat16() if t.is_floating_point() else t.to("cuda") for t in inputs)
    inputs32 = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    reference, reference_grads = run(set_backend(copy.deepcopy(model), "naive"), inputs32, loss_of)
    torch_low, torch_low_grads = run(set_backend(copy.deepcopy(model), "naive").bfloat16(), inputs, loss_of)
    ours, grads = run(set_backend(copy.deepcopy(model), backend).bfloat16(), inputs, loss_of)

    def error(a, b):
        return (a.float() - b.float()).abs().max().item()

    def flat(grads_by_name):  # one vector: a per-tensor bound would be at the mercy of lucky roundings
        return torch.cat([g.float().flatten() for g in grads_by_name.values()])

    assert error(ours, reference) <= 2 * error(torch_low, reference) + 1e-5
    assert error(flat(grads), flat(reference_grads)) <= 3 * error(flat(torch_low_grads), flat(reference_grads)) + 1e-5


def test_set_backend_switches_every_attention_layer():
    model = tiny_encdec(backend="naive")
    assert set_backend(model, "auto") is model
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(layers) == 1 + 2 * 2 and all(layer.backend == "auto" for layer in layers)
    with pytest.raises(ValueError, match="backend must be"):
        set_backend(model, "xformers")


def test_gpt_is_causal_and_generate_follows_its_own_argmax():
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    tokens = torch.randint(0, 17, (2, 9))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 17
    assert torch.allclose(model(tokens)[0][:, :6], model(changed)[0][:, :6], atol=1e-6)
    assert not torch.allclose(model(tokens)[0][:, 6:], model(changed)[0][:, 6:], atol=1e-3)
    generated = model.generate(tokens[:, :3], max_new_tokens=6, temperature=0)
    assert generated.shape == (2, 9) and torch.equal(generated[:, :3], tokens[:, :3])
    logits, _ = model(generated[:, :-1])
    assert torch.equal(logits[:, 2:].argmax(-1), generated[:, 3:])


# Triton's interpreter takes seconds per step: its decode kernel is checked in tests/test_kvcache.py.
@pytest.mark.parametrize("cache", ["dense", "paged"])
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_gpt_generates_the_same_tokens_from_a_kv_cache(backend, cache):
    """Prompt once, then one token per step through flash_attention_with_kvcache (paged: blocks of 4, so
    steps cross block boundaries): greedy and sampled tokens equal the cache-free generate's."""
    torch.manual_seed(0)
    model = set_backend(tiny_gpt().eval(), backend)
    tokens = torch.randint(0, 17, (3, 5))
    expected = model.generate(tokens, max_new_tokens=9, temperature=0)
    assert torch.equal(model.generate(tokens, max_new_tokens=9, temperature=0, cache=cache, block_size=4), expected)
    sampled = [model.generate(tokens, 9, generator=torch.Generator().manual_seed(2), cache=c, block_size=4)
               for c in (None, cache)]
    assert torch.equal(*sampled)


def test_gpt_kv_cache_refuses_what_does_not_fit():
    model = tiny_gpt().eval()
    with pytest.raises(ValueError, match="cache must be None, 'dense' or 'paged'"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 1, cache="ring")
    with pytest.raises(ValueError, match="must fit block_size"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), model.cfg.block_size, cache="dense")


def test_gpt_loss_is_cross_entropy_and_embeddings_are_tied():
    model = tiny_gpt()
    tokens = torch.randint(0, 17, (2, 8))
    logits, loss = model(tokens[:, :-1], tokens[:, 1:])
    expected = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert loss.item() == pytest.approx(expected.item())
    assert model.lm_head.weight is model.token_embed.weight


def test_encdec_greedy_decode_follows_its_own_argmax():
    torch.manual_seed(0)
    model = tiny_encdec().eval()
    src = torch.randint(0, 10, (3, 13))
    out = model.greedy_decode(src, bos_id=data.BOS, max_new_tokens=6)
    assert out.shape == (3, 6)
    tgt_in = torch.cat([torch.full((3, 1), data.BOS), out[:, :-1]], dim=1)
    assert torch.equal(model(src, tgt_in).argmax(-1), out)


def test_encdec_ignores_padded_source_positions():
    torch.manual_seed(0)
    model = tiny_encdec().eval()
    src = torch.randint(0, 10, (1, 9))
    tgt = torch.randint(0, 12, (1, 5))
    padded_src = torch.cat([src, torch.randint(0, 10, (1, 4))], dim=1)
    padding = torch.zeros(1, 13, dtype=torch.bool)
    padding[:, 9:] = True
    assert torch.allclose(model(padded_src, tgt, src_padding_mask=padding), model(src, tgt), atol=1e-5)


def test_encdec_embeddings_tied_or_not():
    tied = tiny_encdec()
    assert tied.src_embed is tied.tgt_embed and tied.lm_head.weight is tied.tgt_embed.weight
    untied = tiny_encdec(tie_embeddings=False)
    assert untied.src_embed is not untied.tgt_embed and untied.lm_head.weight is not untied.tgt_embed.weight
    with pytest.raises(ValueError, match="tie_embeddings needs one shared vocabulary"):
        Transformer(TransformerConfig(src_vocab_size=5, tgt_vocab_size=6))


def test_vit_classifies_from_the_class_token():
    model = tiny_vit()
    assert model(torch.randn(3, 2, 12, 12)).shape == (3, 5)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViT(ViTConfig(image_size=10, patch_size=4))


# ---- synthetic data ---------------------------------------------------------------------------------

def test_digit_tasks():
    generator = torch.Generator().manual_seed(0)
    src, tgt_in, tgt_out = data.digit_task_batch(4, 7, "reverse", generator)
    assert torch.equal(tgt_out[:, :-1], src.flip(1)) and (tgt_out[:, -1] == data.EOS).all()
    assert torch.equal(tgt_in[:, 1:], tgt_out[:, :-1]) and (tgt_in[:, 0] == data.BOS).all()
    src, _, tgt_out = data.digit_task_batch(4, 7, "sort", generator)
    assert torch.equal(tgt_out[:, :-1], src.sort(1).values)
    with pytest.raises(ValueError, match="task must be one of"):
        data.digit_task_batch(1, 3, "shuffle", generator)


def test_markov_grammar_samples_its_own_transitions():
    grammar = data.MarkovGrammar(vocab_size=8, branching=2, lag=2, seed=3)
    tokens = grammar.sample(64, 40, torch.Generator().manual_seed(0))
    state, follower = tokens[:, :-2].flatten(), tokens[:, 2:].flatten()
    assert (grammar.successors[state] == follower[:, None]).any(-1).all()
    # The empirical next-token frequencies of each state match its probabilities, within 4 sigma.
    for token in range(8):
        seen = follower[state == token]
        frequency = (grammar.successors[token][:, None] == seen).float().mean(-1)
        assert torch.allclose(frequency, grammar.probs[token], atol=2 / math.sqrt(len(seen)))
    assert 0 < grammar.best_loss(tokens) < math.log(8)
    certain = data.MarkovGrammar(vocab_size=8, branching=1, lag=3, seed=3)  # only the first tokens are random
    tokens = certain.sample(5, 11, torch.Generator().manual_seed(0))
    assert certain.best_loss(tokens) == pytest.approx(2 * math.log(8) / 10)


def test_bar_images_put_one_bar_of_the_labelled_orientation():
    images, labels = data.bar_images(32, 16, torch.Generator().manual_seed(0), noise=0.0)
    for image, label in zip(images[:, 0], labels):
        rows, cols = (image > 0.5).nonzero(as_tuple=True)
        assert len(rows) == 8
        row_step, col_step = (rows[-1] - rows[0]).item(), (cols[-1] - cols[0]).item()
        orientation = data.BAR_ORIENTATIONS[label]
        expected = {"horizontal": (0, 7), "vertical": (7, 0), "diagonal": (7, 7), "anti-diagonal": (7, -7)}
        assert (row_step, col_step) == expected[orientation]


# ---- the training demo ------------------------------------------------------------------------------

def test_training_demo_writes_curves_table_and_plot(tmp_path, capsys):
    backends = ",".join(b for b in CPU_BACKENDS if b != "triton")  # the interpreter is too slow for training
    train_cli.main(
        ["--model", "all", "--steps", "3", "--device", "cpu", "--backends", backends, "--out", str(tmp_path)]
    )
    report = json.loads((tmp_path / "training.json").read_text())
    assert set(report["models"]) == {"encdec", "gpt", "vit"}
    for result in report["models"].values():
        runs = list(result["backends"].values())
        assert len(runs) == len(backends.split(","))
        for run_ in runs:
            assert len(run_["losses"]) == 3 and run_["tokens_per_s"] > 0
            assert all(abs(a - b) < 1e-3 for a, b in zip(run_["losses"], runs[0]["losses"]))
    assert "best_loss" in report["models"]["gpt"]["backends"]["naive"]
    assert "| gpt | naive |" in (tmp_path / "training.md").read_text()
    assert (tmp_path / "training_loss.png").read_bytes().startswith(b"\x89PNG")


def test_training_demo_rejects_unavailable_backend(tmp_path):
    with pytest.raises(SystemExit):
        train_cli.main(["--device", "cpu", "--backends", "nonexistent", "--out", str(tmp_path)])
