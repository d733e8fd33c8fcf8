"""A tiny random PI0 (~80k parameters) and word-level tokenizer, built from a config and saved like a real checkpoint."""

import os

import torch

from common import INSTRUCTION


def build_tiny_pi0(folder: str, max_action_dim: int = 8, chunk_size: int = 8, seed: int = 0) -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PI0Config, PI0ForConditionalGeneration, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]  # Gemma's ids for pad/eos/bos/unk, then the image slot
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(INSTRUCTION.split())))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    # The action expert reads the VLM's KV cache layer by layer: layers, kv heads and head_dim must match.
    gemma = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, patch_size=14, image_size=56, vision_use_head=False)
    config = PI0Config(
        vlm_config=dict(model_type="paligemma", text_config=dict(model_type="gemma", vocab_size=len(vocab), **gemma),
                        vision_config=vision, projection_dim=32, image_token_id=vocab["<image>"]),
        dit_config=dict(model_type="gemma", **gemma),
        chunk_size=chunk_size,
        max_state_dim=16,
        max_action_dim=max_action_dim,
        num_inference_steps=4,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PI0ForConditionalGeneration(config)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
