"""Tokens per second of Hugging Face ``generate`` on a tiny random Llama: attn_implementation "fused_attention"
(attention.integrations.transformers) against "sdpa", the two timed in alternating rounds (a busy spell of
the machine slows both alike), median and spread (interquartile range / median) of the rounds.

    python -m benchmarks.generate                       # CPU, or the GPU when there is one
    python -m benchmarks.generate --batch 8 --prompt 256 --new-tokens 64 --cache static --json out.json

Greedy decoding of a left-padded batch (the last row a quarter padding): one prefill, then decode steps of
one query against the cache, where both implementations are mostly Python and cache updates around a small
attention. Prints the row and the share of our attention calls that ran on our kernels.
"""
import argparse
import json
import platform
import time

import torch

from .timing import BUSY_SPREAD, summarize

IMPLEMENTATIONS = ("fused_attention", "sdpa")


def tiny_llama(hidden, layers, heads, kv_heads, vocab, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(device).eval()


def prompt(batch, length, vocab, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :length // 4] = 0  # left padding: the masks take the key-padding path, not is_causal alone
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


def interleaved_seconds(fns, rounds, device):
    """Per call, its wall-clock seconds over ``rounds`` rounds; each round calls every fn once, in a rotating order."""
    times = [[] for _ in fns]
    for r in range(rounds):
        for i in range(len(fns)):
            j = (i + r) % len(fns)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fns[j]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[j].append(time.perf_counter() - start)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: float32 on a CPU, bfloat16 on a GPU")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128, help="prompt length in tokens (padding included)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds, after one untimed round")
    p.add_argument("--backend", default="auto", help="our backend: auto, triton, cuda, cpu or naive")
    p.add_argument("--json", help="also write the row to this file")
    args = p.parse_args(argv)

    from attention.integrations import transformers as fused_hf

    fused_hf.register(backend=args.backend)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    model = tiny_llama(args.hidden, args.layers, args.heads, args.kv_heads, args.vocab, device, dtype)
    ids, mask = prompt(args.batch, args.prompt, args.vocab, device)
    cache = dict(cache_implementation="static") if args.cache == "static" else {}

    def generate(implementation):
        def run():
            model.set_attn_implementation(implementation)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                     do_sample=False, **cache)
            return out[:, args.prompt:]

        return run

    fns = [generate(name) for name in IMPLEMENTATIONS]
    tokens = {name: fn() for name, fn in zip(IMPLEMENTATIONS, fns)}  # the untimed round
    same_tokens = torch.equal(*tokens.values())
    fused_hf.stats.reset()
    seconds = interleaved_seconds(fns, args.rounds, device)

    new_tokens = args.batch * args.new_tokens
    row = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               dtype=str(dtype).removeprefix("torch."), batch=args.batch, prompt=args.prompt,
               new_tokens=args.new_tokens, cache=args.cache, hidden=args.hidden, layers=args.layers, heads=args.heads,
               kv_heads=args.kv_heads, rounds=args.rounds, same_tokens=same_tokens,
               share_on_our_kernels=fused_hf.stats.share_on_ours(), fallbacks=fused_hf.stats.fallbacks(),
               backends={name: n for (kind, name), n in fused_hf.stats.items() if kind == "backend"})
    print(f"generate, tiny Llama (hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads), "
          f"{row['dtype']} on {row['device']}: batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"{args.cache} cache, {args.rounds} interleaved rounds")
    for name, times in zip(IMPLEMENTATIONS, seconds):
        median, spread = summarize(times)
        row[name] = dict(tokens_per_s=new_tokens / median, median_s=median, spread=spread)
        print(f"  {name:16s} {new_tokens / median:9.1f} tokens/s   median {median * 1e3:8.1f} ms   spread {spread:.0%}")
    row["speedup_vs_sdpa"] = row["fused_attention"]["tokens_per_s"] / row["sdpa"]["tokens_per_s"]
    print(f"  fused_attention / sdpa: {row['speedup_vs_sdpa']:.2f}x; same tokens: {same_tokens}; "
          f"calls on our kernels: {row['share_on_our_kernels']:.0%} {row['backends']}")
    if max(row[name]["spread"] for name in IMPLEMENTATIONS) > BUSY_SPREAD:
        print(f"  warning: a spread over {BUSY_SPREAD:.0%}: the machine was busy; the ratio, timed in the same "
              f"rounds, holds better than the times")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
        print(f"wrote {args.json}")
    return row


if __name__ == "__main__":
    main()
