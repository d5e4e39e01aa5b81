"""Tiny random-weight transformers models, saved as Hugging Face directories, exported by the real converter.

Each ``save_tiny_*`` builds the model from transformers' own classes after ``torch.manual_seed(seed)`` and
writes it with ``save_pretrained``; the same seed gives the same weights, so a test can rebuild the
reference that an ``export_tiny_*`` file was made from. Each ``export_tiny_*`` saves into a temporary
directory and runs :func:`coordinator.model.convert.convert_hf_dir` on it (which verifies against transformers).

Graph inputs are ``input_ids`` and ``attention_mask`` (int64, batch x sequence); the output is ``logits``
for GPT-2 and LLaMA, ``last_hidden_state`` for BERT. Needs torch and transformers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.model.convert import convert_hf_dir

HIDDEN = 64
LAYERS = 4
HEADS = 4
KV_HEADS = 2  # LLaMA uses grouped-query attention: two query heads share each key/value head
VOCAB = 128
INTERMEDIATE = 128
MAX_POSITIONS = 128


LIVELY_STD = 0.3


def save_lively(arch: str, hf_dir: Path, seed: int) -> Path:
    """A tiny random ``arch`` ("llama", "gpt2") whose weight matrices are drawn with std ``LIVELY_STD``: at the
    default 0.02 the greedy tokens soon repeat one id, which would hide a cache that forgets positions."""
    import torch
    from transformers import AutoModelForCausalLM

    {"llama": save_tiny_llama, "gpt2": save_tiny_gpt2}[arch](hf_dir, seed)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * LIVELY_STD)
    model.save_pretrained(str(hf_dir))
    return hf_dir


def save_tiny_gpt2(hf_dir: Path, seed: int = 0) -> Path:
    """Save a random GPT2LMHeadModel (4 layers, hidden 64, vocab 128) into ``hf_dir``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        vocab_size=VOCAB,
        n_positions=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save(GPT2LMHeadModel, config, hf_dir, seed)


def save_tiny_llama(hf_dir: Path, seed: int = 0) -> Path:
    """Save a random LlamaForCausalLM (4 layers, hidden 64, 4 heads over 2 kv heads) into ``hf_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save(LlamaForCausalLM, config, hf_dir, seed)


def save_tiny_bert(hf_dir: Path, seed: int = 0) -> Path:
    """Save a random BertModel (4 layers, hidden 64, vocab 128) into ``hf_dir``."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
    )
    return _save(BertModel, config, hf_dir, seed)


def export_tiny_gpt2(out_path: Path, seed: int = 0) -> Path:
    """Export a tiny random GPT-2 to ``out_path`` (inputs input_ids, attention_mask; output logits)."""
    return _export(save_tiny_gpt2, out_path, seed)


def export_tiny_llama(out_path: Path, seed: int = 0) -> Path:
    """Export a tiny random LLaMA with grouped-query attention to ``out_path`` (output logits)."""
    return _export(save_tiny_llama, out_path, seed)


def export_tiny_bert(out_path: Path, seed: int = 0) -> Path:
    """Export a tiny random BERT encoder to ``out_path`` (output last_hidden_state)."""
    return _export(save_tiny_bert, out_path, seed)


def _save(model_class: Any, config: Any, hf_dir: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(str(hf_dir))
    return hf_dir


def _export(save: Callable[[Path, int], Path], out_path: Path, seed: int) -> Path:
    with tempfile.TemporaryDirectory(prefix="xshard-tiny-") as temp:
        hf_dir = save(Path(temp) / "hf", seed)
        convert_hf_dir(hf_dir, out_path)
    return out_path
