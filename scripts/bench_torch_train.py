#!/usr/bin/env python3
"""PyTorch + PEFT side of `fedcdd bench train --torch`: LoRA training steps (forward,
backward, AdamW, grad clipping at 1.0) in f32, eager mode (no torch.compile), on the same HF
model directory and shapes; prints one JSON object with tokens_per_second (median step).
`--autocast-bf16` runs forward and loss under `torch.autocast("cpu", torch.bfloat16)` (f32
weights and optimizer, bf16 matmuls: PyTorch's usual CPU mixed precision)."""
import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa or eager)")
    ap.add_argument("--autocast-bf16", action="store_true", help="bf16 autocast for forward and loss")
    a = ap.parse_args()
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        sys.exit(f"needs torch, transformers and peft: {e}")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
             "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    targets = [names.get(t.strip(), t.strip()) for t in a.targets.split(",") if t.strip()]
    if "all" in targets:
        targets = list(names.values())
    model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha,
                                             lora_dropout=a.lora_dropout, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq + 1), generator=gen)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.autocast_bf16):
            out = model(input_ids=ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    tokens = a.batch * a.seq
    print(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(), "attn": a.attn,
        "autocast_bf16": a.autocast_bf16,
        "step_seconds": {"min": times[0], "median": median, "max": times[-1]},
        "tokens_per_second": tokens / median,
    }))


if __name__ == "__main__":
    main()
