"""How many of a set of Hugging Face models' attention calls our SDPA drop-in runs on our kernels.

Tiny randomly initialised models (no download), CPU, torch's scaled_dot_product_attention replaced by
attention.scaled_dot_product_attention for the duration: each call is counted as ours or as a fallback
to torch, with explain_sdpa's reason, and the unpadded batch element's output is compared with torch's own
SDPA. `python -m benchmarks.sdpa_coverage`; needs `pip install transformers` (not a dependency of ours).
"""
import collections
import re
import contextlib

import torch
import torch.nn.functional as F

import attention


@contextlib.contextmanager
def counting_sdpa(counts, reasons):
    original = F.scaled_dot_product_attention

    def ours(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        why = attention.explain_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        counts["fallback" if why.torch_fallback else "ours"] += 1
        for reason in why.torch_fallback:
            reasons[re.sub(r"shape \([0-9, ]*\)", "shape ...", reason)[:120]] += 1
        return attention.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                      enable_gqa)

    F.scaled_dot_product_attention = ours
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def models():
    try:
        import transformers as tf
    except ImportError:
        raise SystemExit("benchmarks.sdpa_coverage needs Hugging Face transformers: pip install transformers")

    small = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=100)
    yield "llama-kv4", tf.LlamaForCausalLM(tf.LlamaConfig(**small | dict(num_attention_heads=8,
                                                                              num_key_value_heads=4))), "causal"
    yield "llama-kv2", tf.LlamaForCausalLM(tf.LlamaConfig(**small | dict(num_attention_heads=8,
                                                                              num_key_value_heads=2))), "causal"
    yield "gpt2", tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100)), "causal"
    yield "bert", tf.BertModel(tf.BertConfig(**small)), "encoder"
    yield "vit", tf.ViTModel(tf.ViTConfig(**small | dict(image_size=32, patch_size=8))), "image"
    yield "bart", tf.BartForConditionalGeneration(tf.BartConfig(d_model=64, encoder_attention_heads=4,
                                                                decoder_attention_heads=4, encoder_layers=2,
                                                                decoder_layers=2, encoder_ffn_dim=128,
                                                                decoder_ffn_dim=128, vocab_size=100)), "seq2seq"
    yield "t5", tf.T5ForConditionalGeneration(tf.T5Config(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                                                          vocab_size=100, decoder_start_token_id=0)), "seq2seq"


def run(model, kind):
    """Forward passes (and greedy generation) with and without padding; returns the padded forward's output."""
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 12))
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, :4] = 0  # left padding, as generation batches are
    with torch.no_grad():
        if kind == "image":
            return model(pixel_values=torch.randn(2, 3, 32, 32))[0]
        for mask in (None, padded):
            if kind == "seq2seq":
                out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5])[0]
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            else:
                out = model(input_ids=ids, attention_mask=mask)[0]
                if kind == "causal":
                    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                   pad_token_id=0)
        return out[0]  # the unpadded batch element: padded positions' outputs differ by design


def main():
    total = collections.Counter()
    all_reasons = collections.Counter()
    for name, model, kind in models():
        model.eval()
        model.config._attn_implementation = "sdpa"
        counts, reasons = collections.Counter(), collections.Counter()
        with counting_sdpa(counts, reasons):
            ours = run(model, kind)
        error = (ours - run(model, kind)).abs().max().item()  # against torch's own SDPA
        total += counts
        all_reasons += reasons
        print(f"{name:10s} ours {counts['ours']:4d}  fallback {counts['fallback']:4d}  max |ours - torch| {error:.1e}")
    print(f"{'all':10s} ours {total['ours']:4d}  fallback {total['fallback']:4d} of {sum(total.values())}")
    for reason, n in all_reasons.most_common():
        print(f"  {n:4d}  {reason}")


if __name__ == "__main__":
    main()
