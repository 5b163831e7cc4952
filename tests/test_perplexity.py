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
