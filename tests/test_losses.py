"""The fused chunked LM head + cross-entropy equals the plain computation, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genlab.model.losses as losses
from genlab.model.transformer import ModelConfig, Transformer


@pytest.mark.parametrize("chunk_elements", [1 << 21, 300 * 7])  # one chunk / many uneven chunks
def test_fused_loss_matches_cross_entropy(monkeypatch, chunk_elements):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = (torch.randn(300, 16) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (2, 37))
    targets[0, :5] = -100  # masked positions (prompt tokens in SFT)
    ref = F.cross_entropy((hidden @ weight.t()).reshape(-1, 300), targets.reshape(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref * 3, (hidden, weight))
    ours = losses.linear_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(ours * 3, (hidden, weight))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_model_loss_equals_loss_of_its_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, tie_embeddings=True)).init_weights(1)
    x, y = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    loss = model(x, targets=y)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(x).reshape(-1, 300), y.reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():  # tied head: embedding gets both contributions
        torch.testing.assert_close(fused[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(model(x, targets=y), ref.detach(), atol=1e-6, rtol=1e-6)
