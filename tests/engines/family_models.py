"""A tiny model of any supported family with the quickstart's byte tokenizer, for the engine tests
(vLLM and SGLang load both from one directory)."""

from __future__ import annotations

from pathlib import Path

import torch

from verl_r3.quickstart.model import build_tokenizer
from verl_r3.tiny import tiny_model


def family_model(family: str, **config_kw):
    """``tiny_model(family, **config_kw)`` (float32) with the tokenizer's vocabulary (rounded up to a
    multiple of 8) and special tokens: (model, tokenizer)."""
    tokenizer = build_tokenizer()
    model = tiny_model(family, vocab_size=8 * -(-len(tokenizer) // 8), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config_kw)
    return model, tokenizer


def save_model_dir(path: str | Path, model, tokenizer, dtype: torch.dtype = torch.float32) -> None:
    """The model in ``dtype`` and its tokenizer, saved to ``path``."""
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)


def save_family_model(family: str, path: str | Path, **config_kw):
    """``family_model`` saved to ``path`` in float32; returns the model."""
    model, tokenizer = family_model(family, **config_kw)
    save_model_dir(path, model, tokenizer)
    return model
