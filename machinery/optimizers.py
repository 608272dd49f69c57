"""
Muon, the optimizer the CPU recipe uses for the blocks' matrices (GPT.configure_optimizers picks which
parameters): momentum, then each matrix's update orthogonalised by a few Newton-Schulz steps.
"""

import math

import torch

# torch.optim.Muon's quintic Newton-Schulz coefficients: five steps take every singular value of a
# normalised matrix from about 0.01 up to roughly 0.7..1.2, which trains as well as exactly 1 and costs
# far less than an SVD; smaller ones stay smaller (0.001 reaches only 0.47: docs 4.2.3)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalise(g, dtype):
    """g (m, n) -> about U V^T, where U S V^T is g's SVD: the same directions, the singular values near 1
    (but for the tiniest, above)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # (n, m): iterate on the wide side, so that the Gram matrix is the smaller one
    x = x / x.norm().clamp(min=1e-7)  # Frobenius norm 1 keeps every singular value in the iteration's range
    for _ in range(NS_STEPS):
        gram = x @ x.T  # (m, m)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # (aI + bG + cG^2) x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update, step for step, with the Newton-Schulz iteration in a dtype of our choice:
    Nesterov momentum, then each matrix's update orthogonalised and scaled to AdamW's update size
    (torch's adjust_lr_fn='match_rms_adamw'). torch.optim.Muon always orthogonalises in bfloat16, which a
    CPU without bfloat16 instructions emulates, many times slower than float32 (fast_path picks)."""

    def __init__(self, params, lr, weight_decay, momentum=0.95, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        # found_inf: a () tensor on the device, 1 when the step must be skipped (health.py: Guard.allows_step sets
        # it, as GradScaler does for fused AdamW); the skip is then arithmetic on the device, never a host read
        keep = None if getattr(self, "found_inf", None) is None else 1 - self.found_inf
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                grad = p.grad if keep is None else torch.where(keep > 0, p.grad, 0)  # a bad step's NaNs go
                buf.lerp_(grad, 1 - group["momentum"] if keep is None else (1 - group["momentum"]) * keep)
                update = orthogonalise(grad.lerp(buf, group["momentum"]), self.ns_dtype)  # Nesterov
                # an orthogonal (m, n) update has entries of RMS 1/sqrt(max(m, n)): this makes it AdamW's ~0.2
                scale = 0.2 * math.sqrt(max(p.shape))
                if keep is None:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"] * scale)
                else:  # the same step, times keep: nothing moves when it is 0
                    p.mul_(1 - group["lr"] * group["weight_decay"] * keep)
                    p.sub_(update * (group["lr"] * scale * keep))
