"""Ring attention on CPU ranks against single-device attention: prints the max error, forward and backward.

Run with ``torchrun --nproc-per-node 4 recipes/ring_parity_demo.py`` (``bash scripts/demo.sh`` does it).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from hf_ringcp import ring_attention, shard_sequence, unshard_sequence


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    b, hq, hkv, s, d = 1, 8, 2, 64 * world, 32
    q, k, v, dout = (torch.randn(b, h, s, d) for h in (hq, hkv, hkv, hq))
    if rank == 0:
        print(f"{world} gloo ranks, {s} tokens, {hq} query / {hkv} key-value heads, head_dim {d}, float32")
        header = ("layout", "comm", "causal", "max |out err|", "max |dq err|", "max |dk err|")
        print("{:<11} {:<10} {:<7} {:>14} {:>13} {:>13}".format(*header))
    for layout, comm, causal in itertools.product(("zigzag", "contiguous"), ("p2p", "allgather"), (True, False)):
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = torch.nn.functional.scaled_dot_product_attention(*full, is_causal=causal, enable_gqa=True)
        ref.backward(dout)
        local = [shard_sequence(x, 2, layout=layout).requires_grad_() for x in (q, k, v)]
        out = ring_attention(*local, causal=causal, layout=layout, comm=comm)
        out.backward(shard_sequence(dout, 2, layout=layout))
        err_out = (unshard_sequence(out.detach(), 2, layout=layout) - ref).abs().max().item()
        err_dq = (unshard_sequence(local[0].grad, 2, layout=layout) - full[0].grad).abs().max().item()
        err_dk = (unshard_sequence(local[1].grad, 2, layout=layout) - full[1].grad).abs().max().item()
        if rank == 0:
            print(f"{layout:<11} {comm:<10} {causal!s:<7} {err_out:>14.2e} {err_dq:>13.2e} {err_dk:>13.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
