"""attention.integrations.transformers: tiny random models of every attention family against transformers' own
attention ("sdpa"; "eager" for Gemma-2, whose softcap SDPA refuses), in float32: logits, gradients, greedy
generation, and the share of attention calls that ran on our kernels."""
import pytest
import torch

# CI must not skip these: tests/conftest.py lists transformers in REQUIRED_IN_CI.
transformers = pytest.importorskip("transformers")

from attention.integrations import transformers as fused_hf  # noqa: E402

NAME = fused_hf.register()
VOCAB, SEQ, NEW_TOKENS, PAD = 128, 10, 16, 0
DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, pad_token_id=PAD, eos_token_id=None, bos_token_id=None)


def _configs():
    t = transformers
    return {
        "llama-mha": (t.LlamaConfig(**DECODER, num_key_value_heads=4), "causal_lm", "sdpa"),
        "llama-gqa": (t.LlamaConfig(**DECODER, num_key_value_heads=2), "causal_lm", "sdpa"),
        # a window shorter than the prompt, and generation past it (the sliding cache drops keys)
        "mistral": (t.MistralConfig(**DECODER, num_key_value_heads=2, sliding_window=4), "causal_lm", "sdpa"),
        # softcap small enough to bend the scores; sliding and full layers alternate
        "gemma2": (t.Gemma2Config(**DECODER, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                  attn_logit_softcapping=0.5, query_pre_attn_scalar=16), "causal_lm", "eager"),
        "gpt2": (t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                              resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=PAD, eos_token_id=None,
                              bos_token_id=None), "causal_lm", "sdpa"),
        "bert": (t.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0), "masked_lm", "sdpa"),
        "vit": (t.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, num_labels=10), "vision", "sdpa"),
        "bart": (t.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                              decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                              pad_token_id=PAD, eos_token_id=None, bos_token_id=None, forced_eos_token_id=None,
                              decoder_start_token_id=1), "seq2seq", "sdpa"),
        "t5": (t.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          dropout_rate=0.0, pad_token_id=PAD, eos_token_id=None, decoder_start_token_id=1),
               "seq2seq", "sdpa"),
    }


CONFIGS = _configs()
AUTO_CLASS = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM",
              "vision": "AutoModelForImageClassification", "seq2seq": "AutoModelForSeq2SeqLM"}
GENERATES = [name for name, (_, kind, _) in CONFIGS.items() if kind in ("causal_lm", "seq2seq")]
# What may fall back, per model: T5's relative attention bias (its cross-attention, without bias, runs on ours).
ALLOWED_FALLBACKS = {"t5": {fused_hf.POSITION_BIAS}}


def build(name):
    config, kind, reference = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(transformers, AUTO_CLASS[kind]).from_config(config, attn_implementation=reference)
    return model.eval(), kind, reference


def batch(kind, padded, seed=1):
    """Model inputs, and the (B, N) positions of the output that are real tokens (compared; pads are not)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "vision":
        return dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g)), None
    ids = torch.randint(2, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # left padding, as for generation
        ids[1, :3], mask[1, :3] = PAD, 0
    if kind == "seq2seq":
        # a decoder longer than the encoder: cross-attention with more queries than keys
        decoder_ids = torch.randint(2, VOCAB, (2, SEQ + 2), generator=g)
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids), None
    return dict(input_ids=ids, attention_mask=mask), mask.bool()


def run(model, implementation, inputs, real):
    """Logits (real positions) and every parameter's gradient of a fixed random projection of them."""
    model.set_attn_implementation(implementation)
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    if real is not None:
        logits = logits[real]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_share(name):
    """Every call ran on our kernels, but what the model may fall back for; returns the share on ours."""
    fallbacks = fused_hf.stats.fallbacks()
    assert set(fallbacks) <= ALLOWED_FALLBACKS.get(name, set()), fallbacks
    assert fused_hf.stats.calls(ours=True) > 0
    return fused_hf.stats.share_on_ours()


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_gradients_match(name, padded):
    if CONFIGS[name][1] == "vision" and padded:
        pytest.skip("images have no padding")
    model, kind, reference = build(name)
    inputs, real = batch(kind, padded)
    expected, expected_grads = run(model, reference, inputs, real)
    fused_hf.stats.reset()
    logits, grads = run(model, NAME, inputs, real)
    check_share(name)
    assert (logits - expected).abs().max() <= 1e-4
    assert expected_grads.keys() == grads.keys()
    for param, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[param], atol=1e-4, rtol=1e-4, msg=param)


def generate(model, implementation, inputs, **kwargs):
    model.set_attn_implementation(implementation)
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    return out[:, -NEW_TOKENS:]


@pytest.mark.parametrize("name", GENERATES)
def test_greedy_generation_matches(name):
    """16 greedy tokens from a left-padded batch, dynamic cache: prefill, then decode steps (Nq = 1)."""
    model, kind, reference = build(name)
    inputs, _ = batch(kind, padded=True)
    inputs.pop("decoder_input_ids", None)
    expected = generate(model, reference, inputs)
    fused_hf.stats.reset()
    assert torch.equal(generate(model, NAME, inputs), expected)
    check_share(name)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral", "bart"])
def test_unpadded_decode_steps_run_on_the_kvcache_kernel(name):
    """Without padding, each decode step (one query row per head) runs on the split-KV decode kernel (so does
    any call of at most DECODE_MAX_QUERIES rows: this prompt too). Same tokens as transformers'."""
    model, kind, reference = build(name)
    inputs, _ = batch(kind, padded=False)
    inputs.pop("decoder_input_ids", None)
    expected = generate(model, reference, inputs)
    fused_hf.stats.reset()
    assert torch.equal(generate(model, NAME, inputs), expected)
    decode_calls = sum(n for (kind_, _), n in fused_hf.stats.items() if kind_ == "decode")
    layers = model.config.num_hidden_layers * (2 if kind == "seq2seq" else 1)  # BART: self- and cross-attention
    assert decode_calls >= (NEW_TOKENS - 1) * layers


@pytest.mark.parametrize("name", ["llama-gqa", "mistral"])
def test_static_cache_generation_matches(name):
    """A static cache hands every layer all its slots, the empty ones included: causal must end at the query.
    Mistral's sliding layers keep a window of slots, rolled once full."""
    model, kind, reference = build(name)
    inputs, _ = batch(kind, padded=True)
    expected = generate(model, reference, inputs, cache_implementation="static")
    fused_hf.stats.reset()
    assert torch.equal(generate(model, NAME, inputs, cache_implementation="static"), expected)
    check_share(name)


def test_mask_plans():
    """The plans: causal cut at the last query in a static cache; the sliding window's width; padding read
    at the keys' absolute positions (a sliding cache's offset)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    static = fused_hf.fused_attention_mask(batch_size=1, q_length=2, kv_length=8, q_offset=torch.tensor(3))
    plan = static.fused_attention_plan
    assert (plan.causal, plan.window_left, plan.kv_used, plan.has_padding) == (True, -1, 5, False)
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    sliding = fused_hf.fused_attention_mask(batch_size=1, q_length=1, kv_length=4, q_offset=6, kv_offset=3,
                                            mask_function=sliding_window_causal_mask_function(4),
                                            attention_mask=padding, local_size=4)
    plan = sliding.fused_attention_plan
    assert (plan.causal, plan.window_left, plan.kv_used, plan.has_padding) == (True, 3, 4, False)
    assert plan.fallback_reason is None


def test_dropout_runs_on_our_kernels_in_training():
    """In training the model's attention dropout reaches our kernels: the same seed gives the same loss,
    another seed another one, and no call falls back."""
    config = transformers.LlamaConfig(**DECODER, num_key_value_heads=2, attention_dropout=0.5)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=NAME).train()
    inputs, _ = batch("causal_lm", padded=True)
    losses = []
    fused_hf.stats.reset()
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        losses.append(model(**inputs).logits.sum())
    check_share("llama-gqa")
    assert losses[0] == losses[1] and losses[0] != losses[2]
    with torch.no_grad():
        assert model.eval()(**inputs).logits.sum() != losses[0]


@pytest.mark.parametrize("case", ["packed-sequences", "4-D mask"])
def test_fallbacks_are_counted_and_match(case):
    """Masks our kernels do not take run on transformers' SDPA path, with the same result, and are counted."""
    model, kind, reference = build("llama-gqa")
    ids = torch.randint(2, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3))
    if case == "packed-sequences":  # two sequences in one row: the mask is block-diagonal
        inputs, reason = dict(position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])), fused_hf.OTHER_PATTERN
    else:
        mask = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        mask[5:, :2] = False  # not a key-padding pattern: only some queries lose those keys
        inputs, reason = dict(attention_mask=mask[None, None]), fused_hf.FOREIGN_MASK
    results = []
    for implementation in (reference, NAME):
        model.set_attn_implementation(implementation)
        fused_hf.stats.reset()
        with torch.no_grad():
            results.append(model(input_ids=ids, use_cache=False, **inputs).logits)
    assert fused_hf.stats.fallbacks() == {reason: model.config.num_hidden_layers}
    assert fused_hf.stats.calls(ours=True) == 0
    assert (results[0] - results[1]).abs().max() <= 1e-5


def test_register_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be"):
        fused_hf.register("fused_attention_other", backend="flash")


def test_generate_benchmark_row():
    """benchmarks.generate's row on a one-layer model: both implementations timed, same tokens, all on ours."""
    from benchmarks import generate as bench

    row = bench.main(["--device", "cpu", "--batch", "2", "--prompt", "8", "--new-tokens", "2", "--hidden", "32",
                      "--layers", "1", "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--rounds", "2"])
    assert row["same_tokens"] and row["share_on_our_kernels"] == 1.0 and not row["fallbacks"]
    assert all(row[name]["tokens_per_s"] > 0 for name in bench.IMPLEMENTATIONS)
