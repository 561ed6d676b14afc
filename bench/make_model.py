"""Generate a Llama-3-shaped checkpoint with random bf16 weights on the GPU (no download).

    python bench/make_model.py --out /tmp/llama8b [--layers 32]
    python bench/make_model.py --out /tmp/llama70w --shape llama-3-70b --layers 22   # 70B's width, 41.9 GB
    python bench/make_model.py --out /tmp/llama14b --shape llama-14b    # 48 layers, 14.5 B params, 27.0 GiB
    python bench/make_model.py --out /tmp/llama24b --shape llama-24b    # 40 layers, 24.0 B params, 44.6 GiB

Weights are drawn on the GPU (seeded), saved as safetensors shards with the project's
byte-level tokenizer, filled up to the model's 128,256 ids so that every id it emits decodes to text
(serving clients time tokens by the text they stream). A `.complete` marker makes a second call a no-op.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Llama-3's widths (hidden, intermediate, attention heads, KV heads); the depth is --layers. The 14B- and
# 24B-class shapes are Llama-style (head dim 128, 8 KV heads, Llama-3's vocabulary) at the widths of the
# common 14B (Qwen2.5-14B's hidden and MLP) and 24B (Mistral-Small-24B's hidden and MLP) models.
SHAPES = {"llama-3-8b": (4096, 14336, 32, 8), "llama-3-70b": (8192, 28672, 64, 8),
          "llama-14b": (5120, 13824, 40, 8), "llama-24b": (5120, 32768, 40, 8)}
LAYERS = {"llama-14b": 48, "llama-24b": 40}  # their depth unless --layers says otherwise (others: 32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=None, help="default: 48 for llama-14b, 40 for llama-24b, else 32")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    a = ap.parse_args()
    a.layers = a.layers or LAYERS.get(a.shape, 32)
    out = Path(a.out)
    spec = {"layers": a.layers, "shape": a.shape, "dtype": "bfloat16", "seed": 0, "tokenizer": "bytes+filler"}
    marker = out / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        print(f"{out} already complete")
        return

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from sharedcache_integrations.hf.embedded import build_tokenizer

    t0 = time.perf_counter()
    hidden, intermediate, heads, kv_heads = SHAPES[a.shape]
    cfg = LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        g = torch.Generator(device="cuda").manual_seed(0)
        for _, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    torch.cuda.synchronize()
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params in {time.perf_counter() - t0:.1f}s")
    model.save_pretrained(out, max_shard_size="5GB")
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=False).save_pretrained(out)
    build_tokenizer(8192, vocab_size=cfg.vocab_size).save_pretrained(out)  # every id decodes to text
    marker.write_text(json.dumps(spec))
    print(f"saved {out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
