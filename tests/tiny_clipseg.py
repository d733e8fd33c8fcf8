"""A tiny random CLIPSeg (a few thousand parameters) with a word-level CLIP tokenizer, built from a config and saved
like a real checkpoint (what affordance_ppo.py's clipseg provider loads with from_pretrained)."""

import json
import os


def build_tiny_clipseg(folder: str, image_size: int = 32, seed: int = 0) -> str:
    import torch
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer,
                              ViTImageProcessor)

    os.makedirs(folder, exist_ok=True)
    words = ["the", "tail", "of", "peg", "handle", "a"]
    tokens, merges = ["<|startoftext|>", "<|endoftext|>"], []  # BPE merges left to right: each word is one token
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        tokens += parts
        for p in parts[1:]:
            merges.append(f"{parts[0]} {p}")
            parts[0] += p
            tokens.append(parts[0])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    images = ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.48, 0.46, 0.41],
                               image_std=[0.27, 0.26, 0.28])
    CLIPSegProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    layer = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPSegConfig(
        text_config=dict(layer, vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(layer, image_size=image_size, patch_size=8),
        projection_dim=16, extract_layers=[0, 1], reduce_dim=8, decoder_num_attention_heads=2,
        decoder_intermediate_size=16,
    )
    torch.manual_seed(seed)
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    return folder
