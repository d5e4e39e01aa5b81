"""Tiny random CLIP, ViT, Whisper and RoBERTa models from transformers' own classes, saved as HF directories.

Each ``save_tiny_*`` seeds torch, builds the model from its config and writes it with ``save_pretrained``.
Sizes are kept tiny (hidden 32, two layers, 16x16 images, 8 mel bins x 16 frames) so a conversion takes
seconds. Needs torch and transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HIDDEN = 32
TEXT_HIDDEN = 64  # the encoders' attention mask (batch x 1 x seq x seq) stays well below their hidden states
LAYERS = 2
HEADS = 2
INTERMEDIATE = 64
VOCAB = 96
IMAGE_SIZE = 16
PATCH = 8
CHANNELS = 3
MEL_BINS = 8
AUDIO_POSITIONS = 8  # the encoder reads 2 * AUDIO_POSITIONS frames
LABELS = 5


def save_tiny_clip(hf_dir: Path, seed: int = 0, layers: int = LAYERS) -> Path:
    """A random CLIPModel: text tower (vocab 96) and vision tower (16x16x3 images), projection 16."""
    from transformers import CLIPConfig, CLIPModel

    text = {
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "eos_token_id": 2,
        "bos_token_id": 1,
        "pad_token_id": 0,
    }
    vision = {
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "num_channels": CHANNELS,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return _save(CLIPModel, config, hf_dir, seed)


def save_tiny_vit(hf_dir: Path, seed: int = 0) -> Path:
    """A random ViTForImageClassification over 16x16x3 images with 5 labels."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        num_channels=CHANNELS,
        num_labels=LABELS,
    )
    return _save(ViTForImageClassification, config, hf_dir, seed)


def save_tiny_whisper(
    hf_dir: Path,
    seed: int = 0,
    decoder_layers: int = 1,
    d_model: int = HIDDEN,
    init_std: float = 0.02,
    **generation: Any,
) -> Path:
    """A random WhisperForConditionalGeneration: 8 mel bins, 16 frames, two encoder layers.

    A decoder to cut by layer needs ``d_model`` 64 (its attention mask then stays below its hidden states).
    ``init_std`` scales the random weights (0.3 makes greedy decoding vary its tokens); ``generation``
    sets config fields such as ``suppress_tokens`` and ``begin_suppress_tokens``.
    """
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=MEL_BINS,
        d_model=d_model,
        encoder_layers=LAYERS,
        decoder_layers=decoder_layers,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=INTERMEDIATE,
        decoder_ffn_dim=INTERMEDIATE,
        max_source_positions=AUDIO_POSITIONS,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        init_std=init_std,
        **generation,
    )
    return _save(WhisperForConditionalGeneration, config, hf_dir, seed)


def save_tiny_roberta(hf_dir: Path, seed: int = 0, layers: int = LAYERS) -> Path:
    """A random RobertaModel encoder (vocab 96, padding id 1, as RoBERTa's)."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=2 * INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=80,
        pad_token_id=1,
    )
    return _save(RobertaModel, config, hf_dir, seed)


def save_tiny_bert(hf_dir: Path, seed: int = 0, layers: int = LAYERS) -> Path:
    """A random BertModel encoder (vocab 96)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=2 * INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return _save(BertModel, config, hf_dir, seed)


def _save(model_class: Any, config: Any, hf_dir: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(str(hf_dir))
    return hf_dir
