"""Synthetic tasks generated on the fly, one per demo model; every sampler draws from a torch.Generator
so the same seed gives every backend the same batches.

- digit strings to reverse or sort (encoder-decoder),
- a Markov "language" whose next token depends on the token two back (GPT),
- noisy images of a bar in one of four orientations (ViT).
"""
import math

import torch

# Digit tasks: tokens 0-9 are digits, then the decoder's begin and end markers.
BOS, EOS = 10, 11
DIGIT_VOCAB_SIZE = 12
DIGIT_TASKS = ("reverse", "sort")


def digit_task_batch(batch_size, length, task, generator):
    """src (B, L) random digits; the answer is src reversed or sorted. Returns (src, tgt_in, tgt_out),
    where the decoder reads tgt_in = [BOS, answer] (B, L + 1) and predicts tgt_out = [answer, EOS]."""
    if task not in DIGIT_TASKS:
        raise ValueError(f"task must be one of {DIGIT_TASKS}, got {task!r}")
    src = torch.randint(0, 10, (batch_size, length), generator=generator)
    answer = src.flip(1) if task == "reverse" else src.sort(dim=1).values
    tgt_in = torch.cat([torch.full((batch_size, 1), BOS), answer], dim=1)
    tgt_out = torch.cat([answer, torch.full((batch_size, 1), EOS)], dim=1)
    return src, tgt_in, tgt_out


class MarkovGrammar:
    """A Markov chain in which each token is drawn given the token ``lag`` positions back: each token
    allows ``branching`` successors with random probabilities. With lag 2 the model must learn to look
    two tokens back, which takes attention (lag 1 would be a bigram table)."""

    def __init__(self, vocab_size=16, branching=3, lag=2, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.vocab_size, self.branching, self.lag = vocab_size, branching, lag
        self.successors = torch.rand(vocab_size, vocab_size, generator=generator).argsort(-1)[:, :branching]
        weights = torch.rand(vocab_size, branching, generator=generator) + 0.1
        self.probs = weights / weights.sum(-1, keepdim=True)  # (vocab_size, branching)
        self.cumulative = self.probs.cumsum(-1)

    def sample(self, batch_size, length, generator):
        """(B, length) token ids: ``lag`` uniform tokens, then the chain."""
        tokens = torch.empty(batch_size, length, dtype=torch.long)
        tokens[:, : self.lag] = torch.randint(0, self.vocab_size, (batch_size, self.lag), generator=generator)
        uniform = torch.rand(batch_size, length, generator=generator)
        for t in range(self.lag, length):
            state = tokens[:, t - self.lag]
            choice = (uniform[:, t, None] > self.cumulative[state]).sum(-1).clamp_max(self.branching - 1)
            tokens[:, t] = self.successors[state, choice]
        return tokens

    def best_loss(self, tokens):
        """The cross-entropy a perfect model gets predicting tokens[:, 1:] from what precedes them: the
        chain's own probabilities, and log(vocab_size) for the tokens before the chain starts."""
        state = tokens[:, : -self.lag]  # (B, L - lag)
        hit = self.successors[state] == tokens[:, self.lag :, None]  # (B, L - lag, branching)
        log_p = (self.probs[state] * hit).sum(-1).log()
        n_uniform = tokens.shape[0] * (self.lag - 1)
        n_targets = tokens.shape[0] * (tokens.shape[1] - 1)
        return (n_uniform * math.log(self.vocab_size) - log_p.sum().item()) / n_targets


BAR_ORIENTATIONS = ("horizontal", "vertical", "diagonal", "anti-diagonal")
_BAR_STEPS = torch.tensor([[0, 1], [1, 0], [1, 1], [1, -1]])  # (row step, col step) per orientation


def bar_images(batch_size, image_size, generator, noise=0.1):
    """Images (B, 1, size, size) of Gaussian noise plus one bright bar of length size // 2 at a random
    place; the label (B,) is the bar's orientation, an index into BAR_ORIENTATIONS."""
    labels = torch.randint(0, len(BAR_ORIENTATIONS), (batch_size,), generator=generator)
    length = image_size // 2
    half = length // 2
    center = torch.randint(half, image_size - half, (batch_size, 2), generator=generator)  # keeps the bar inside
    offsets = torch.arange(length) - half  # (length,)
    rows = center[:, :1] + _BAR_STEPS[labels, :1] * offsets  # (B, length)
    cols = center[:, 1:] + _BAR_STEPS[labels, 1:] * offsets
    images = noise * torch.randn(batch_size, 1, image_size, image_size, generator=generator)
    batch_index = torch.arange(batch_size)[:, None].expand_as(rows)
    images[batch_index, 0, rows, cols] += 1.0
    return images, labels
