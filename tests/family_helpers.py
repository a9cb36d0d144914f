"""Tiny random-weight models of every supported family, built from configs (no hub), for the tests that run
each family (test_families, test_search_evo). Kept apart from any test module so that each test file stands on
its own.
"""

import torch
import transformers

FAMILIES = ("opt", "llama", "mistral", "qwen2", "qwen3")
VOCAB, SEQLEN = 101, 32


def tiny_model(model_type: str, attn: str = "sdpa", seed: int = 0):
    """2 layers, hidden 32, 4 heads (2 key/value heads where the family has grouped-query attention).

    Weights are drawn 15x wider than the default (initializer_range 0.3) so the logits are far from uniform and
    a wrong mask or position changes the perplexity by much more than the tests' tolerance. Mistral and Qwen2
    get a sliding window shorter than the windows; Qwen2's second layer only (max_window_layers=1), so its two
    layers are passed different masks.
    """
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, initializer_range=0.3, attn_implementation=attn)
    if model_type == "opt":
        config = transformers.OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=32)
    else:
        extra = {"mistral": dict(sliding_window=16),
                 "qwen2": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)}.get(model_type, {})
        cls = transformers.AutoConfig.for_model(model_type).__class__
        config = cls(**common, intermediate_size=80, num_key_value_heads=2, **extra)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()
