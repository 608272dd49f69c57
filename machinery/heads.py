"""
What each attention head does, in four numbers (docs chapter 5.6.1): three read from its attention weights,
one from what the model loses without it.

- previous-token score: the weight a position puts on the one just before it (1 = always the previous token);
- induction score: on a sequence of random tokens repeated twice, the weight each token of the second copy puts
  on the token that followed its first occurrence, the pattern of an induction head ("A B ... A -> look at B",
  Olsson et al. 2022: In-context Learning and Induction Heads);
- first-token score: the weight on position 0, where heads park attention they have no use for;
- knock-out effect: the loss on a fixed sample with the head's output zeroed, minus the loss with it (how much
  the model needs the head; negative: it does better without).

The scores take attention weights (B, nh, T, T), as `lens.py: trace` reads them; the knock-out takes the model.
"""

import torch


def previous_token_scores(weights):
    """(nh,) mean weight from each position t >= 1 to t - 1, over the batch: weights (B, nh, T, T)."""
    return weights.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))


def first_token_scores(weights):
    """(nh,) mean weight from each position t >= 1 to position 0 (position 0 can only look at itself)."""
    return weights[:, :, 1:, 0].mean(dim=(0, 2))


def induction_scores(weights, half):
    """(nh,) on sequences whose second half (length half) repeats the first: the mean weight from position t of
    the second copy to t - half + 1, the token after the first occurrence of t's token."""
    # the diagonal t - (half - 1) runs over the queries t = half - 1 .. T - 1; [1:] keeps the second copy's
    return weights.diagonal(offset=-(half - 1), dim1=-2, dim2=-1)[:, :, 1:].mean(dim=(0, 2))


def repeated_random_tokens(batch, half, vocab_size, seed=0):
    """(batch, 2 * half) token ids: half random tokens, then the same again (the induction test's input)."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab_size, (batch, half), generator=generator)
    return torch.cat([first, first], dim=1)


def knockout_effects(model, X, Y):
    """(loss, [[loss with head h of layer l zeroed - loss]]): the model's loss on X, Y (B, T), and how much it
    rises without each head. A head's
    output is its slice of the input to its layer's c_proj (the heads side by side, (B, T, nh * hs)), so a
    forward pre-hook that zeroes that slice removes exactly that head."""
    config = model.config
    head_size = config.n_embd // config.n_head
    with torch.no_grad():
        base = model(X, Y)[1].item()
        effects = []
        for block in model.transformer.h:
            row = []
            for head in range(config.n_head):
                def zero_head(module, inputs, head=head):
                    x = inputs[0].clone()
                    x[..., head * head_size:(head + 1) * head_size] = 0
                    return (x,)
                hook = block.attn.c_proj.register_forward_pre_hook(zero_head)
                try:
                    row.append(model(X, Y)[1].item() - base)
                finally:
                    hook.remove()
            effects.append(row)
    return base, effects
