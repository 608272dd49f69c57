"""Run train.py as `python train.py args` does, and watch its optimizer steps from outside.

    python tests/probe_train.py RECORD.jsonl POISON train.py args...

RECORD.jsonl gets one line per AdamW step: the gradient norm the optimizer was handed (after any
clipping) and the sum of |w| of its weights before and after the step. POISON is a comma-separated list
of 1-based step numbers (or '-') whose backward pass is made to produce infinite gradients while the
loss itself stays finite: what the NaN guard must catch. The tests read these to see the step itself,
not what train.py says about it."""

import json
import runpy
import sys

import torch

import model

record_path, poison, sys.argv = sys.argv[1], sys.argv[2], sys.argv[3:]
poisoned_steps = {int(s) for s in poison.split(",")} if poison != "-" else set()
steps_done = [0]


class InfiniteGradient(torch.autograd.Function):
    """The identity going forward; an infinite gradient coming back."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


real_forward = model.GPT.forward


def forward(self, idx, targets=None, *args, **kwargs):
    logits, loss = real_forward(self, idx, targets, *args, **kwargs)
    if loss is not None and torch.is_grad_enabled() and steps_done[0] + 1 in poisoned_steps:
        loss = InfiniteGradient.apply(loss)
    return logits, loss


real_step = torch.optim.AdamW.step


def weight_sum(params):
    return sum(p.detach().double().abs().sum().item() for p in params)


def step(self, *args, **kwargs):
    params = [p for group in self.param_groups for p in group["params"]]
    grads = [p.grad.double() for p in params if p.grad is not None]
    entry = {"step": steps_done[0] + 1, "grad_norm": torch.sqrt(sum((g ** 2).sum() for g in grads)).item(),
             "weights_before": weight_sum(params)}
    result = real_step(self, *args, **kwargs)
    entry["weights_after"] = weight_sum(params)
    steps_done[0] += 1
    with open(record_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    return result


model.GPT.forward = forward
torch.optim.AdamW.step = step
runpy.run_path(sys.argv[0], run_name="__main__")
