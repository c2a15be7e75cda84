"""``python tests/distributed/cp_kernels.py``: which CPU kernels change their last bits when context parallelism
shards the work (docs/parallel.md, "Why not bitwise, and what is"). One thread, float32, random inputs of the
tiny FLUX's sizes (2 samples, 4 prompt + 64 image tokens, width 64, 4 heads x 16). Each line prints whether the
sharded way gives the same bits as the one-process way; the answers are this machine's kernels' (another CPU or
torch build may differ)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 64), torch.randn(64)
    prompt = torch.randn(2, 4, 64)  # [B, T, C]: the prompt tokens; a rank of K = 2 gets 2 of them
    tokens = torch.randn(2, 68, 64)
    whole = F.linear(prompt, weight, bias)
    half = prompt[:, :2]
    checks = {
        "linear, 2 of 4 prompt rows per sample (contiguous copy) vs the 4-row product": torch.equal(
            F.linear(half.contiguous(), weight, bias), whole[:, :2]),
        "linear, 1 of 4 prompt rows per sample (a rank of K = 4) vs the 4-row product": torch.equal(
            F.linear(prompt[:, :1].contiguous(), weight, bias), whole[:, :1]),
        "linear, the same 2 rows as a strided view vs as a contiguous copy": torch.equal(
            F.linear(half, weight, bias), F.linear(half.contiguous(), weight, bias)),
        "linear, 34 of 68 rows per sample vs the 68-row product": torch.equal(
            F.linear(tokens[:, :34].contiguous(), weight, bias), F.linear(tokens, weight, bias)[:, :34]),
        "linear, 1 sample vs the 2-sample batch": torch.equal(
            F.linear(tokens[:1], weight, bias), F.linear(tokens, weight, bias)[:1]),
    }
    q, k, v = (torch.randn(2, 4, 68, 16) for _ in range(3))  # [B, H, S, D]
    out = F.scaled_dot_product_attention(q, k, v)
    gathered = torch.cat([torch.arange(0, 2), torch.arange(4, 36), torch.arange(2, 4), torch.arange(36, 68)])
    checks.update({
        "attention, keys in Ulysses' gathered order (rank 0's prompt+image, then rank 1's)": torch.equal(
            F.scaled_dot_product_attention(q, k[:, :, gathered], v[:, :, gathered]), out),
        "attention, queries in the gathered order (rows put back)": torch.equal(
            F.scaled_dot_product_attention(q[:, :, gathered], k, v)[:, :, gathered.argsort()], out),
        "attention, 2 of 4 heads": torch.equal(
            F.scaled_dot_product_attention(q[:, :2].contiguous(), k[:, :2].contiguous(), v[:, :2].contiguous()),
            out[:, :2]),
        "attention, 1 sample vs the 2-sample batch": torch.equal(
            F.scaled_dot_product_attention(q[:1], k[:1], v[:1]), out[:1]),
    })
    for name, same in checks.items():
        print(f"{'same bits' if same else 'DIFFERENT'}  {name}")


if __name__ == "__main__":
    main()
