"""Many small block calls as one variable-length kernel call.

With packed documents a rank's plan holds about one call per document and step (causal squares on the diagonal,
unmasked rectangles where a document spans chunks). Launched one by one, hundreds of small calls cost far more than
their FLOPs (measured on an H200: ~150 µs per call and merge, 0.06 of single-GPU efficiency on short documents).
Calls of one kind whose query rows do not overlap are instead gathered into packed ``[T, H, D]`` tensors and run
as one varlen call (``cum_seq_q``/``cum_seq_k`` mark the calls), and their outputs, LSEs and gradients are merged
by index in a few vectorised passes.

:class:`Varlen` is the kernel: flash attention's varlen op on CUDA, or a loop over the sequences with any block
backend (:func:`loop_varlen`: the CPU path, and the reference the tests compare the CUDA kernel with).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hf_ringcp.ring.kernels import Backend, block_backward, block_forward
from hf_ringcp.ring.plan import BlockCall

aten = torch.ops.aten
#: Below this many small calls the per-call path is used (no packing copies).
MIN_CALLS = 5
#: Calls with more query or key rows than this stay on the per-call path: large blocks run faster in the plain
#: kernel (cuDNN) than in flash's varlen kernel, and launches no longer dominate them (H200: grouping every call
#: cost zigzag_global 0.52 -> 0.37 of single-GPU efficiency on short documents, while it took the per-document
#: zigzag from 0.06 to 0.12).
MAX_ROWS = 2048


@dataclass(frozen=True)
class Varlen:
    """A variable-length attention kernel over packed tokens.

    ``forward(q [Tq, Hq, D], k [Tk, Hkv, D], v, cu_q, cu_k, max_q, max_k, causal, scale) -> (out [Tq, Hq, D],
    lse [Hq, Tq] float32)``; ``backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale) ->
    (dq, dk, dv)``; ``cu_q``/``cu_k`` int32 ``[n + 1]`` on the device. ``causal`` squares align at the top left.
    """

    name: str
    forward: Callable
    backward: Callable
    supports: Callable[[torch.Tensor, torch.Tensor], str | None]


def _flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    out, lse, _, _, _ = aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                      scale=scale)
    return out, lse.reshape(q.shape[1], -1)[:, : q.shape[0]].float()


def _flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    empty = torch.empty(0, device=q.device)
    dq, dk, dv = aten._flash_attention_backward(dout, q, k, v, out, lse.contiguous(), cu_q, cu_k, max_q, max_k, 0.0,
                                                causal, empty, empty, scale=scale)
    return dq, dk, dv


def _flash_supports(q, k):
    if q.device.type != "cuda":
        return "it runs on CUDA tensors only"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "it needs float16 or bfloat16"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return "head_dim must be a multiple of 8 and at most 256"
    return None


FLASH_VARLEN = Varlen("flash_varlen", _flash_forward, _flash_backward, _flash_supports)


def _bounds(cu: torch.Tensor) -> list[tuple[int, int]]:
    return list(itertools.pairwise(cu.tolist()))


def loop_varlen(backend: Backend) -> Varlen:
    """The varlen interface on top of a block ``backend``: one call per sequence (CPU; the tests' reference)."""

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        outs, lses = [], []
        for (a, b), (c, d) in zip(_bounds(cu_q), _bounds(cu_k)):
            o, lse = block_forward(backend, *(x.transpose(0, 1)[None] for x in (q[a:b], k[c:d], v[c:d])), causal,
                                   scale)
            outs.append(o[0].transpose(0, 1))
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (a, b), (c, d) in zip(_bounds(cu_q), _bounds(cu_k)):
            view = lambda x: x.transpose(0, 1)[None]
            g = block_backward(backend, view(dout[a:b]), view(q[a:b]), view(k[c:d]), view(v[c:d]), view(out[a:b]),
                               lse[None, :, a:b], causal, scale)
            dq[a:b] = g[0][0].transpose(0, 1)
            dk[c:d] += g[1][0].transpose(0, 1)
            dv[c:d] += g[2][0].transpose(0, 1)
        return dq, dk, dv

    return Varlen(f"loop_{backend.name}", forward, backward, backend.supports)


def group_calls(calls: Sequence[BlockCall]) -> tuple[list[list[BlockCall]], list[BlockCall]]:
    """Split ``calls`` into varlen groups (one kind, non-overlapping query rows) and the calls left alone.

    Masked (band) calls and calls larger than :data:`MAX_ROWS` are left alone.
    """
    groups: list[tuple[str, list[BlockCall], list[tuple[int, int]]]] = []
    rest = []
    for c in sorted(calls, key=lambda c: (c.kind, c.q_start)):
        if c.kind == "band" or c.q_end - c.q_start > MAX_ROWS or c.kv_end - c.kv_start > MAX_ROWS:
            rest.append(c)
            continue
        for kind, members, rows in groups:
            if kind == c.kind and rows[-1][1] <= c.q_start:
                members.append(c)
                rows.append((c.q_start, c.q_end))
                break
        else:
            groups.append((c.kind, [c], [(c.q_start, c.q_end)]))
    return [members for _, members, _ in groups], rest


def _index(ranges: Sequence[tuple[int, int]], device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges]).to(device)


def _cu(ranges: Sequence[tuple[int, int]], device) -> tuple[torch.Tensor, int]:
    lengths = [b - a for a, b in ranges]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return cu, max(lengths)


@dataclass
class PackedGroup:
    """One varlen group: the calls, their packed row indices and the ``cum_seq`` tensors."""

    calls: list[BlockCall]
    q_ranges: list[tuple[int, int]]
    kv_ranges: list[tuple[int, int]]
    q_index: torch.Tensor
    kv_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    @staticmethod
    def of(calls: list[BlockCall], device) -> PackedGroup:
        q_ranges = [(c.q_start, c.q_end) for c in calls]
        kv_ranges = [(c.kv_start, c.kv_end) for c in calls]
        cu_q, max_q = _cu(q_ranges, device)
        cu_k, max_k = _cu(kv_ranges, device)
        return PackedGroup(calls, q_ranges, kv_ranges, _index(q_ranges, device), _index(kv_ranges, device),
                           cu_q, cu_k, max_q, max_k)

    @property
    def causal(self) -> bool:
        return self.calls[0].kind == "causal"


@functools.lru_cache(maxsize=512)
def plan_groups(calls: tuple[BlockCall, ...], device: str) -> tuple[tuple[PackedGroup, ...], tuple[BlockCall, ...]]:
    """The varlen groups of a plan (with their index tensors on ``device``) and its other calls, cached: every
    layer runs the same plans."""
    small = [c for c in calls if c.kind != "band" and c.q_end - c.q_start <= MAX_ROWS
             and c.kv_end - c.kv_start <= MAX_ROWS]
    if len(small) < MIN_CALLS:
        return (), calls
    grouped, rest = group_calls(calls)
    packed = []
    for members in grouped:
        if len(members) == 1:
            rest.append(members[0])
        else:
            packed.append(PackedGroup.of(members, device))
    return tuple(packed), tuple(rest)


def pack_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[1, H, S, D]`` -> the rows ``index`` as packed ``[T, H, D]`` (contiguous)."""
    return x[0].transpose(0, 1).index_select(0, index)


def unpack_rows(x: torch.Tensor) -> torch.Tensor:
    """Packed ``[T, H, D]`` -> a ``[1, H, T, D]`` view."""
    return x.transpose(0, 1)[None]
