"""Perplexity against a hand computation on a tiny model built here."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunelab.data.tokens import TokenStream
from prunelab.eval.perplexity import perplexity


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _hand_ppl(model, ids: list[int], seqlen: int, windows: int) -> float:
    """exp(mean NLL) with an explicit loop: windows scored independently, softmax by hand."""
    total, count = 0.0, 0
    for w in range(windows):
        window = ids[w * seqlen : (w + 1) * seqlen]
        with torch.no_grad():
            logits = model(torch.tensor([window])).logits[0].double()
        for position in range(seqlen - 1):
            row = logits[position]
            log_z = math.log(sum(math.exp(v) for v in row.tolist()))
            total += log_z - row[window[position + 1]].item()
            count += 1
    return math.exp(total / count)


def test_perplexity_matches_hand_computation():
    model = _tiny_model()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (1, 103), generator=generator)  # 103 // 20 = 5 windows, 3 tokens dropped
    stream = TokenStream("toy", ids, "toy", "test")
    result = perplexity(model, stream, seqlen=20, batch_size=2, progress=False)
    assert result["windows"] == 5 and result["total_windows"] == 5 and result["full_split"]
    assert result["predicted_tokens"] == 5 * 19
    assert math.isclose(result["ppl"], _hand_ppl(model, ids[0].tolist(), 20, 5), rel_tol=1e-5)


def test_max_windows_caps_and_batching_does_not_change_the_result():
    model = _tiny_model()
    ids = torch.randint(0, 50, (1, 200), generator=torch.Generator().manual_seed(2))
    stream = TokenStream("toy", ids, "toy", "test")
    capped = perplexity(model, stream, seqlen=16, max_windows=3, batch_size=1, progress=False)
    batched = perplexity(model, stream, seqlen=16, max_windows=3, batch_size=3, progress=False)
    assert capped["windows"] == 3 and capped["total_windows"] == 12 and not capped["full_split"]
    assert math.isclose(capped["ppl"], _hand_ppl(model, ids[0].tolist(), 16, 3), rel_tol=1e-5)
    assert math.isclose(capped["ppl"], batched["ppl"], rel_tol=1e-5)


def test_fingerprint_follows_the_tokens():
    a = TokenStream("x", torch.tensor([[1, 2, 3]]), "p", "o")
    b = TokenStream("x", torch.tensor([[1, 2, 3]]), "p", "o")
    c = TokenStream("x", torch.tensor([[1, 2, 4]]), "p", "o")
    assert a.fingerprint == b.fingerprint != c.fingerprint


class _FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: the loss arithmetic alone is under test."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # perplexity() reads the device off a parameter

    def forward(self, input_ids, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits[: input_ids.shape[0]])


def test_perplexity_equals_a_float64_reference_on_a_large_vocabulary():
    """float32 logits of a 49k vocabulary, as SmolLM2 gives: the loss is summed without float32 drift.

    The reference upcasts the same logits to float64 and takes logsumexp minus the target's logit.
    """
    generator = torch.Generator().manual_seed(0)
    vocab, seqlen, windows = 49152, 600, 2
    logits = (torch.randn(windows, seqlen, vocab, generator=generator) * 4 + torch.linspace(0, 20, vocab)).float()
    ids = torch.randint(0, vocab, (1, windows * seqlen), generator=generator)
    result = perplexity(_FixedLogits(logits), TokenStream("toy", ids, "toy", "test"), seqlen, batch_size=2, progress=False)
    exact = logits.double()[:, :-1]
    targets = ids.view(windows, seqlen)[:, 1:]
    nll = torch.logsumexp(exact, dim=-1) - exact.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    reference = math.exp(nll.mean().item())
    assert abs(result["ppl"] / reference - 1) <= 1e-9
