"""Fused LM head + cross-entropy, computed in row chunks.

The usual path materialises logits [N, V], then runs log-softmax, NLL, and their backward
passes over that whole tensor (several passes over N*V floats, far larger than the CPU caches).
Here each chunk of rows computes its logits, log-sum-exp, loss and gradient (softmax - onehot)
while it is still in cache; the gradients for the hidden states and the head weight are formed
in the forward pass and only scaled in backward. Same value and gradients as
`F.cross_entropy(h @ W.T, targets, ignore_index=-100)` (a test); no [N, V] tensor is stored.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 21  # ~8 MB of fp32 logits per chunk


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        ctx.weight_dtype = weight.dtype
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        w = weight.to(dtype)
        valid = targets != -100
        count = valid.sum().clamp_min(1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                h, t, keep = hidden[s : s + chunk].to(dtype), targets[s : s + chunk].clamp_min(0), valid[s : s + chunk]
                logits = (h @ w.t()).float()
                lse = logits.logsumexp(-1)
                total += ((lse - logits.gather(1, t[:, None])[:, 0]) * keep).sum()
                if need_h or need_w:
                    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    grad.scatter_add_(1, t[:, None], -keep[:, None].float())
                    grad.mul_((keep.float() / count)[:, None])
                    grad = grad.to(dtype)
                    if need_h:
                        grad_h[s : s + chunk] = (grad @ w).to(hidden.dtype)
                    if need_w:  # accumulate the head's gradient in fp32 whatever the compute dtype
                        grad_w.addmm_(grad.t(), h) if dtype == torch.float32 else grad_w.add_(grad.t() @ h)
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_output if grad_h is not None else None,
                (grad_w * grad_output).to(ctx.weight_dtype) if grad_w is not None else None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (-100 = ignored)."""
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1))
