"""Tiny random causal LMs built from configs (no downloads), shared by the tests.

Each builder returns a seeded model in eval mode with 2-3 decoder layers, hidden width 32-64
and a vocabulary of 96 tokens. Widths are multiples of 8 so 2:4 and 4:8 patterns fit unless a
test asks otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96


def _build(cls: type[PreTrainedModel], config, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = cls(config)
    # HF initialises with std 0.02, which makes every layer nearly the identity; wider weights
    # make pruning visible in the outputs.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                param.normal_(0.0, 0.15)
    return model.eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    cfg.update(overrides)
    return _build(LlamaForCausalLM, LlamaConfig(**cfg), seed)


def tiny_mistral(seed: int = 0, **overrides) -> MistralForCausalLM:
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=None,
    )
    cfg.update(overrides)
    return _build(MistralForCausalLM, MistralConfig(**cfg), seed)


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    cfg = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
    )
    cfg.update(overrides)
    return _build(Qwen2ForCausalLM, Qwen2Config(**cfg), seed)


def tiny_gemma3(seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    """Alternating sliding (window 4) and full attention, so each layer gets its own mask."""
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    cfg.update(overrides)
    return _build(Gemma3ForCausalLM, Gemma3TextConfig(**cfg), seed)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return _build(GPT2LMHeadModel, GPT2Config(**cfg), seed)


def tiny_opt(seed: int = 0, **overrides) -> OPTForCausalLM:
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32,
    )
    cfg.update(overrides)
    return _build(OPTForCausalLM, OPTConfig(**cfg), seed)


BUILDERS: dict[str, Callable[..., PreTrainedModel]] = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "gemma3": tiny_gemma3,
    "gpt2": tiny_gpt2,
    "opt": tiny_opt,
}


def random_ids(nsamples: int = 4, seqlen: int = 16, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Calibration-like token windows ``[nsamples, seqlen]`` (token 0 avoided: it is a pad id)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (nsamples, seqlen), generator=generator)
