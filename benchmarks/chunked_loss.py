"""Speed and memory of the causal LM's loss in blocks (scaling_lab/chunked_loss.py) against the plain path
(transformers' logits and cross-entropy), on a LoRA forward + backward pass of a Llama built from config.

Each path runs in its own process of one thread, with a trial worker's malloc settings (its peak RSS above its RSS
after a warm-up step, and its tokens/s over --steps steps after it); it prints both and their ratios. On CPU by
default; on a GPU with --device cuda (peak memory then from torch.cuda).

    nice -n 10 python benchmarks/chunked_loss.py [--vocab 32000 --hidden 512 --layers 2 --batch 2 --seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaling_lab import chunked_loss
    from scaling_lab.trial import return_freed_memory

    return_freed_memory()  # as a trial's worker: large freed blocks go back to the system at once
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(config).to(args.device, dtype),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=args.device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    min_logits = 0 if args.path == "chunked" else 1 << 62

    def step() -> None:
        chunked_loss.causal_lm_loss(model, batch, min_logits=min_logits).backward()
        model.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: what the first step allocates once (LoRA gradients, kernels' buffers) is not the loss's
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) from now on
    baseline = rss_mb("VmRSS")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else rss_mb("VmHWM")
    return {"tokens_per_s": args.steps * input_ids.numel() / seconds, "peak_above_mb": peak - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--path", choices=["plain", "chunked"], help=argparse.SUPPRESS)  # one measuring process
    args = parser.parse_args()
    if args.path:
        print(json.dumps(measure(args)))
        return
    results = {}
    for path in ("plain", "chunked"):
        command = [sys.executable, __file__, *sys.argv[1:], "--path", path]
        results[path] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout
                                   .strip().splitlines()[-1])
        print(f"{path}: {results[path]['tokens_per_s']:,.0f} tokens/s, peak {results[path]['peak_above_mb']:,.0f} MB "
              f"above a warm step's start", flush=True)
    logits_mb = args.batch * args.seq_len * args.vocab * 4 / 2**20
    print(f"logits of one pass: {logits_mb:,.0f} MB in fp32; chunked ÷ plain: tokens/s "
          f"{results['chunked']['tokens_per_s'] / results['plain']['tokens_per_s']:.3f}, peak memory "
          f"{results['chunked']['peak_above_mb'] / max(results['plain']['peak_above_mb'], 1e-9):.3f}")


if __name__ == "__main__":
    main()
