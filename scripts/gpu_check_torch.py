#!/usr/bin/env python3
"""scripts/gpu-check's PyTorch part: the card's two ceilings, transformers' generate on the same
model shape as the peer, and the table of everything at the end.

  python3 scripts/gpu_check_torch.py ceilings --out DIR      # DIR/ceilings.json
  python3 scripts/gpu_check_torch.py transformers --out DIR  # DIR/transformers.json
  python3 scripts/gpu_check_torch.py table --out DIR         # reads the JSON files, prints the table
"""
import argparse
import json
import os
import statistics
import sys
import time

# Llama-3-8B's shape (the preset scripts/gpu_check_bench.ts serves with dummy weights).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def timed(torch, fn, reps):
    """Median milliseconds of fn over reps, with device events, after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ceilings(out):
    import torch
    x = torch.randn((1 << 30) // 4, device="cuda")  # 1 GiB a side: far past the L2
    y = torch.empty_like(x)
    ms = timed(torch, lambda: y.copy_(x), 10)
    moved = 2 * x.numel() * 4
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms = timed(torch, lambda: a @ b, 10)
    r = {
        "device": torch.cuda.get_device_name(),
        "copy_gb_s": moved / ms / 1e6,  # bytes read and written
        "read_gb_s": moved / 2 / ms / 1e6,  # the same, halved: a copy's reads alone
        "bf16_tflop_s": 2 * 8192 ** 3 / gemm_ms / 1e9,
    }
    json.dump(r, open(os.path.join(out, "ceilings.json"), "w"), indent=2)
    print(f"     {r['device']}: copy {r['copy_gb_s']:.0f} GB/s (read + written), read {r['read_gb_s']:.0f} GB/s, "
          f"bf16 GEMM {r['bf16_tflop_s']:.0f} TFLOP/s", flush=True)


def transformers_generate(out):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA3_8B)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16).eval()
    r = {}
    for batch in (1, 64):
        ids = torch.randint(300, 30000, (batch, 16), device="cuda")
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            new = 128
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            torch.cuda.synchronize()
            s = time.perf_counter() - t0
        r[str(batch)] = {"tok_s": batch * new / s}
        print(f"     transformers generate, batch {batch}: {batch * new / s:.1f} tok/s", flush=True)
    json.dump(r, open(os.path.join(out, "transformers.json"), "w"), indent=2)


def table(out):
    def load(name):
        p = os.path.join(out, name)
        return json.load(open(p)) if os.path.exists(p) else {}
    c, b, t = load("ceilings.json"), load("bench.json"), load("transformers.json")
    rows = []
    if c:
        rows.append(("card", c["device"], f"copy {c['copy_gb_s']:.0f} GB/s, read {c['read_gb_s']:.0f} GB/s, "
                                          f"bf16 {c['bf16_tflop_s']:.0f} TFLOP/s"))
    if "goldens_tokens" in b:
        g = b["goldens_tokens"]
        rows.append(("stories260K goldens (f32)", f"{g['exact']}/{g['of']}", "token for token; HTTP "
                     f"{b.get('goldens', {}).get('exact', '?')}/{b.get('goldens', {}).get('of', '?')}"))
    if "random_model" in b:
        m = b["random_model"]
        rows.append(("random GQA vs CPU engine", f"{m['same']}/{m['of']}", f"logprobs within {m['max_logprob_diff']:.1e}"))
    if "decode_1" in b:
        d = b["decode_1"]
        roof = ""
        if c and d.get("weight_bytes"):
            ceiling = c["read_gb_s"] * 1e9 / d["weight_bytes"]
            roof = f"{100 * d['tok_s'] / ceiling:.0f}% of the read roofline ({ceiling:.0f} tok/s)"
        rows.append(("8B bf16 decode, 1 stream", f"{d['tok_s']:.1f} tok/s", roof))
    for conc, s in sorted(b.get("streams", {}).items(), key=lambda kv: int(kv[0])):
        peer = ""
        if conc == "64" and "64" in t:
            peer = f", transformers batch 64 {t['64']['tok_s']:.0f} tok/s ({s['output_tok_s'] / t['64']['tok_s']:.1f}x)"
        rows.append((f"8B bf16 decode, {conc} streams (HTTP)", f"{s['output_tok_s']:.0f} tok/s",
                     f"TTFT p50/p99 {s['ttft_p50_ms']:.0f}/{s['ttft_p99_ms']:.0f} ms, ITL p50/p99 "
                     f"{s['itl_p50_ms']:.1f}/{s['itl_p99_ms']:.1f} ms{peer}"))
    if "prefill" in b:
        p = b["prefill"]
        frac = ""
        if c:
            flops = 2 * 8.03e9 * p["tok_s"]
            frac = f"{100 * flops / (c['bf16_tflop_s'] * 1e12):.0f}% of the bf16 GEMM rate"
        rows.append((f"8B bf16 prefill of {p['tokens']}", f"{p['tok_s']:.0f} tok/s", frac))
    if "1" in t:
        rows.append(("transformers generate, batch 1", f"{t['1']['tok_s']:.1f} tok/s", ""))
    w = max(len(r[0]) for r in rows) if rows else 0
    print("\n| what | figure | against |\n| --- | --- | --- |")
    for name, fig, note in rows:
        print(f"| {name.ljust(w)} | {fig} | {note} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["ceilings", "transformers", "table"])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    {"ceilings": ceilings, "transformers": transformers_generate, "table": table}[a.what](a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
