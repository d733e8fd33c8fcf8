"""What a PI0-sized VLA base costs per env step: `common.PI0Base` timed on synthetic observations, batch by batch.

With a VLA as the base, every env step needs a_base, and a query of the VLA (SigLIP + a 2B Gemma prefix, then the
action expert's flow-matching steps) costs far more than a residual's MLP. PI0Base queries the model only when an env's
action chunk runs out (every `chunk_steps` steps, and after a reset), batched over the envs that need it, so its cost
per env step is the query's time over the batch and the chunk. This benchmark builds a PI0 with the layer sizes of the
released pi0 (transformers' PI0Config defaults: PaliGemma's 2B Gemma with a 257,152-token vocabulary, SigLIP so400m at
224 px, a 300M Gemma action expert, chunks of 50, 10 flow steps) and random weights (real ones cannot be downloaded
here: the timing does not depend on their values), saves it with `save_pretrained`, loads it through `PI0Base` as a
user's checkpoint would be, and reports for each batch size B:
- query_ms: one batched query of all B envs (median over repeats, after a warm-up),
- step_ms: a call of the base where no chunk runs out (indexing the cached chunks),
- per_vector_step_ms: (query + (chunk_steps - 1) * step) / chunk_steps, the base's mean time per step of B envs,
- base_env_steps_per_s: B / per_vector_step_ms, the ceiling the base alone puts on a run's env steps/s,
- peak_mem_gb: the GPU memory peak (CUDA only).

    python benchmarks/vla_cost.py                                          # a GPU: full size, bf16
    python benchmarks/vla_cost.py --size tiny --batch-sizes 1 2 --device cpu --out /tmp/vla_cost.json   # a smoke run
    python benchmarks/vla_cost.py --replot A.json B.json --png out.png     # plot earlier results side by side
"""

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


@dataclass
class Args:
    size: str = "full"
    """'full' (pi0's layer sizes, ~3.5B parameters) or 'tiny' (a few layers of width 32, for a smoke run)"""
    batch_sizes: List[int] = field(default_factory=lambda: [1, 16, 64, 256, 512])
    """numbers of envs queried at once"""
    chunk_steps: Optional[int] = None
    """actions executed per query (PI0Base's default: the model's whole chunk, 50 at full size)"""
    dtype: str = "bfloat16"
    """the dtype the weights are saved in, and so loaded in (PI0Base loads a checkpoint as it was saved)"""
    repeats: int = 5
    """timed queries per batch size, after one warm-up query"""
    camera_size: int = 64
    """the env's camera resolution (make_env's default; PI0Base resizes to the model's 224)"""
    num_cameras: int = 2
    """images per observation (PegInsertionSide renders base_camera and hand_camera: 2)"""
    device: str = "auto"
    """'auto' (CUDA if available), 'cuda' or 'cpu'"""
    out: str = "benchmarks/results/gpu/vla_cost/vla_cost.json"
    """the results JSON (a PNG of the same name beside it)"""
    replot: List[str] = field(default_factory=list)
    """plot these results JSONs into --png and exit (no timing)"""
    png: Optional[str] = None
    """the plot's path (default: --out with .png)"""


def plot(files, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for file in files:
        with open(file) as f:
            d = json.load(f)
        cams = d["args"].get("num_cameras", 1)
        rows, label = d["results"], f"{d['args']['dtype']}, {cams} camera(s), {d['gpu'] or d['device']}"
        batch = [r["batch"] for r in rows]
        ax1.plot(batch, [r["query_ms"] for r in rows], "o-", label=label)
        ax2.plot(batch, [r["base_env_steps_per_s"] for r in rows], "o-", label=label)
    ax1.set(xscale="log", yscale="log", xlabel="envs per query (batch)", ylabel="one batched query (ms)",
            title="PI0-sized base: query time")
    ax2.set(xscale="log", yscale="log", xlabel="envs (batch)", ylabel="env steps/s the base allows",
            title=f"with chunks of {rows[0]['chunk_steps']} actions per query")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


def build_checkpoint(folder, size, dtype, device):
    """A random PI0 at the requested size, with a word-level tokenizer for the instruction, saved like a real one."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PI0Config, PI0ForConditionalGeneration, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(common.INSTRUCTION.split())))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer, backend.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    if size == "full":
        default = PI0Config()
        text = default.vlm_config.text_config.to_dict()  # PaliGemma's Gemma, vocabulary size included
        config = PI0Config(vlm_config=dict(model_type="paligemma", text_config=text,
                                           vision_config=default.vlm_config.vision_config.to_dict(),
                                           projection_dim=default.vlm_config.projection_dim,
                                           image_token_id=vocab["<image>"]))
    else:
        gemma = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16)
        config = PI0Config(
            vlm_config=dict(model_type="paligemma",
                            text_config=dict(model_type="gemma", vocab_size=len(vocab), **gemma),
                            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                                               image_size=56, vision_use_head=False),
                            projection_dim=32, image_token_id=vocab["<image>"]),
            dit_config=dict(model_type="gemma", **gemma), chunk_size=8, max_state_dim=16, max_action_dim=8,
            num_inference_steps=4)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 3.5B parameters is much faster on a GPU
        model = PI0ForConditionalGeneration(config).to(getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "action_stats.json"), "w") as f:
        json.dump(dict(mean=[0.0] * config.max_action_dim, std=[0.5] * config.max_action_dim), f)
    del model
    return n_params


def main(args):
    if args.replot:
        return plot(args.replot, args.png or os.path.splitext(args.replot[0])[0] + ".png")
    if args.size not in ("full", "tiny"):
        raise common.ConfigError(f"--size must be 'full' or 'tiny', got {args.size!r}")
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.num_cameras < 1:
        raise common.ConfigError("--batch-sizes, --repeats and --num-cameras must be >= 1")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    info = dict(command="python " + " ".join(sys.argv), args=vars(args), device=device.type,
                gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None, torch=torch.__version__)
    import transformers

    info["transformers"] = transformers.__version__
    results = []
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        info["parameters"] = build_checkpoint(folder, args.size, args.dtype, device)
        info["build_and_save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = common.PI0Base(folder, 7, 1, device, chunk_steps=args.chunk_steps)
        info["load_s"] = time.perf_counter() - t0
        info["loaded_dtype"] = str(loaded.model.dtype)
        for b in args.batch_sizes:
            base = loaded.resized(b)  # the same model, caches for b envs
            gen = torch.Generator().manual_seed(b)
            obs = dict(state=torch.randn(b, common.STATE_DIM, generator=gen).to(device),
                       rgb=torch.randint(0, 256, (b, args.num_cameras, args.camera_size, args.camera_size, 3),
                                         generator=gen, dtype=torch.uint8).to(device))
            everyone = torch.ones(b, dtype=torch.bool, device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            query, step = [], []
            for i in range(args.repeats + 1):  # the first round warms up
                base.reset(everyone)
                sync()
                t0 = time.perf_counter()
                a = base(obs)  # every chunk has run out: one batched query
                sync()
                t1 = time.perf_counter()
                base(obs)  # cached: indexing only
                sync()
                t2 = time.perf_counter()
                if i:
                    query.append(t1 - t0), step.append(t2 - t1)
            if not torch.isfinite(a).all() or a.shape != (b, 7):
                raise RuntimeError(f"PI0Base returned {tuple(a.shape)} with non-finite values at batch {b}")
            q, s, c = statistics.median(query), statistics.median(step), base.chunk_steps
            per_step = (q + (c - 1) * s) / c
            row = dict(batch=b, chunk_steps=c, query_ms=q * 1e3, step_ms=s * 1e3,
                       per_vector_step_ms=per_step * 1e3, base_env_steps_per_s=b / per_step,
                       peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
            results.append(row)
            print(json.dumps(row), flush=True)
            del base, obs, a
            if device.type == "cuda":
                torch.cuda.empty_cache()
    info["results"] = results
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {args.out}")
    plot([args.out], args.png or os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    common.exit_on_config_error(lambda: main(tyro.cli(Args)))
