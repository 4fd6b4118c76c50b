"""Seconds per training step of one network alone in fp32 / bf16 autocast, contiguous /
channels-last (forward, cross-entropy, backward, AdamW), on random data: what the hardware
gives each combination, without any method or data loading.

    python benchmarks/net_precision.py [--net unet2d] [--batch 4] [--size 128 128] [--steps 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from semidiff.nets import create_net


def step_time(net_name: str, batch: int, size: list[int], steps: int, channels_last: bool, bf16: bool) -> float:
    torch.manual_seed(0)
    net = create_net(net_name, 1, 4)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x, y = torch.randn(batch, 1, *size), torch.randint(0, 4, (batch, *size))
    if channels_last:
        fmt = torch.channels_last if len(size) == 2 else torch.channels_last_3d
        net, x = net.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="unet2d")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, nargs="+", default=[128, 128])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    print(f"| {args.net}, batch {args.batch}, {args.size}, {torch.get_num_threads()} thread(s) | s/step |\n|---|---|")
    for channels_last in (False, True):
        for bf16 in (False, True):
            s = step_time(args.net, args.batch, args.size, args.steps, channels_last, bf16)
            print(f"| {'channels-last' if channels_last else 'contiguous'}, {'bf16 autocast' if bf16 else 'fp32'} | {s:.3f} |")


if __name__ == "__main__":
    main()
