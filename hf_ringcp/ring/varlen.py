"""Many small block calls as one kernel call: at most two per ring step, whatever the number of documents.

With packed documents a rank's plan holds about one call per document and step (causal squares on the diagonal,
unmasked rectangles where a document spans chunks). Launched one by one, hundreds of small calls cost far more than
their FLOPs (measured on an H200: ~150 µs per call and merge, 0.06 of single-GPU efficiency on short documents).
Calls of one kind whose query rows do not overlap are instead gathered into packed ``[T, H, D]`` tensors and run
as one varlen call (``cum_seq_q``/``cum_seq_k`` mark the calls), and their outputs, LSEs and gradients are merged
by index in a few vectorised passes.

:class:`Varlen` is the kernel: flash attention's varlen op on CUDA, or a loop over the sequences with any block
backend (:func:`loop_varlen`: the reference the CPU tests run in place of the CUDA kernel).

:class:`PackedSchedule` is the engine the rings run on packed rows: a rank's steps, each as the launches of
:func:`hf_ringcp.ring.plan.step_launches` (one varlen call for the causal squares of every document and one for the
unmasked rectangles on CUDA; one call under a ``[Tq, Tk]`` mask on the CPU), with every index, ``cu_seqlens``, mask
and output-merge plan built once per batch on the device (:func:`schedule_for`, cached on the placement) and reused
by every layer, forward, backward and recomputation. The per-layer path then runs a constant number of ops per step
and never syncs with the host. Rows are handled ``[S, H, D]`` (:func:`rows`), the layout of Hugging Face's
``[B, S, H, D]`` memory for batch 1.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hf_ringcp.ring.kernels import Backend, additive_mask, block_backward, block_forward
from hf_ringcp.ring.merge import merge_into
from hf_ringcp.ring.plan import DENSE_ROWS, BlockCall, Launch, step_launches

aten = torch.ops.aten
#: Below this many small calls the per-call path is used (no packing copies).
MIN_CALLS = 5
#: Calls with more query or key rows than this stay on the per-call path (the rule is the plan's: large blocks run
#: faster on the dense kernel).
MAX_ROWS = DENSE_ROWS


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


# ------------------------------------------------------------------------------ the engine of packed rows


# Both views are one ``as_strided`` (not an index and a transpose): they run several times per step, and every
# dispatched op is host time on the GPU.


def rows(x: torch.Tensor) -> torch.Tensor:
    """``[1, H, S, D]`` -> the ``[S, H, D]`` view of its rows (batch 1)."""
    return x.as_strided((x.shape[2], x.shape[1], x.shape[3]), (x.stride(2), x.stride(1), x.stride(3)),
                        x.storage_offset())


def blocks(x: torch.Tensor) -> torch.Tensor:
    """``[T, H, D]`` rows -> the ``[1, H, T, D]`` view the block kernels take."""
    return x.as_strided((1, x.shape[1], x.shape[0], x.shape[2]), (x.numel(), x.stride(1), x.stride(0), x.stride(2)),
                        x.storage_offset())


Rows = slice | torch.Tensor


def _take(x: torch.Tensor, index: Rows, dim: int = 0) -> torch.Tensor:
    if isinstance(index, slice):
        return x[index] if dim == 0 else x[:, index]
    return x.index_select(dim, index)


@dataclass
class Step:
    """One ring step before packing: the calls of this rank's queries against a K/V buffer, and where the buffer's
    rows live: ``kv_map[buffer row]`` is the row of the K/V tensor the step reads, ``grad_map[buffer row]`` the row
    of the dK/dV accumulator its gradients go to (``None``: the buffer row itself). CPU ``int64`` tensors."""

    calls: tuple[BlockCall, ...]
    kv_map: torch.Tensor | None = None
    grad_map: torch.Tensor | None = None


@dataclass
class DeviceLaunch:
    """A :class:`~hf_ringcp.ring.plan.Launch` with its rows, ``cu_seqlens``, mask and output writes on the device.

    ``q_rows``: the local query rows read (a slice for ``"call"``; else one per packed row, repeats allowed);
    ``kv_rows`` / ``kv_grad``: the K/V source rows read and the dK/dV accumulator rows written. ``writes``:
    ``(first, destination rows, packed rows)`` of the forward output; ``first`` rows are copied, the others merged
    by LSE; the packed rows are ``None`` for all of them in order.
    """

    kind: str
    causal: bool
    q_rows: Rows
    writes: tuple[tuple[bool, Rows, Rows | None], ...]
    kv_rows: Rows
    kv_grad: Rows
    call: BlockCall | None = None
    bias: torch.Tensor | None = None
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0


def _arange(ranges, device=None) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges]).to(device)


def _mapped(index: torch.Tensor, mapping: torch.Tensor | None) -> torch.Tensor:
    return index if mapping is None else mapping[index]


def _as_rows(index: torch.Tensor, device) -> Rows:
    """A slice where ``index`` is a run of consecutive rows (views instead of copies), else the index on ``device``."""
    if index.numel() and bool((index == torch.arange(int(index[0]), int(index[0]) + index.numel())).all()):
        return slice(int(index[0]), int(index[0]) + index.numel())
    return index.to(device)


def _slice_writes(written: torch.Tensor, a: int, b: int):
    """Writes of query rows ``[a, b)``: runs of rows first written here (copied) or already written (merged)."""
    w = written[a:b].clone()
    cuts = [0, *((w[1:] != w[:-1]).nonzero().flatten() + 1).tolist(), b - a]
    written[a:b] = True
    return tuple((not bool(w[s]), slice(a + s, a + e), slice(s, e)) for s, e in itertools.pairwise(cuts))


def _query_rows(written: torch.Tensor, q_idx: torch.Tensor, device) -> tuple[Rows, tuple]:
    """A launch's query rows and output writes: a slice (views, no gathers, writes and merges in place) where its
    packed rows are a run of consecutive local rows, as a step's causal squares over every local document are."""
    rows_ = _as_rows(q_idx, device)
    if isinstance(rows_, slice):
        return rows_, _slice_writes(written, rows_.start, rows_.stop)
    return rows_, _index_writes(written, q_idx, device)


def _index_writes(written: torch.Tensor, dst: torch.Tensor, device):
    """Writes of packed rows to query rows ``dst`` (repeats allowed): one layer per repeat, first writes copied."""
    t = dst.numel()
    order = torch.argsort(dst, stable=True)
    ordered = dst[order]
    starts = torch.ones(t, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    positions = torch.arange(t)
    first_of_group = torch.cummax(torch.where(starts, positions, 0), 0).values
    layer = torch.empty(t, dtype=torch.int64)
    layer[order] = positions - first_of_group
    out = []
    for n in range(int(layer.max()) + 1):
        src = (layer == n).nonzero().flatten()
        rows_ = dst[src]
        first = ~written[rows_]
        written[rows_] = True
        for flag, sel in ((True, first), (False, ~first)):
            if bool(sel.any()):
                s = src[sel]
                whole = s.numel() == t  # every packed row, in order
                out.append((flag, rows_[sel].to(device), None if whole else s.to(device)))
    return tuple(out)


def _mask_bias(launch: Launch, dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query rows, buffer rows and the additive ``[Tq, Tk]`` mask of a ``"masked"`` launch (rows seen by no call
    are left out, so no row of the call is fully masked: the CPU kernel would return LSE 0 for it, not -inf)."""
    q_idx = torch.unique(_arange([(c.q_start, c.q_end) for c in launch.calls]))
    kv_idx = torch.unique(_arange([(c.kv_start, c.kv_end) for c in launch.calls]))
    q_pos = dict(zip(q_idx.tolist(), range(q_idx.numel())))
    kv_pos = dict(zip(kv_idx.tolist(), range(kv_idx.numel())))
    visible = torch.zeros(q_idx.numel(), kv_idx.numel(), dtype=torch.bool)
    for c in launch.calls:
        r, k = q_pos[c.q_start], kv_pos[c.kv_start]
        n, m = c.q_end - c.q_start, c.kv_end - c.kv_start
        block = torch.ones(n, m, dtype=torch.bool)
        if c.kind == "causal":
            block = block.tril()
        elif c.kind == "band":
            block = c.band_mask()
        visible[r : r + n, k : k + m] |= block
    if not bool(visible.any(-1).all()):
        raise AssertionError("a packed launch has a query row without a visible key")
    return q_idx, kv_idx, additive_mask(visible, dtype).to(device)


def _device_launch(launch: Launch, step: Step, written: torch.Tensor, device, dtype) -> DeviceLaunch:
    if launch.kind == "call":
        (c,) = launch.calls
        kv = torch.arange(c.kv_start, c.kv_end)
        bias = None
        if c.kind == "band":
            visible = c.band_mask()
            if not bool(visible.any(-1).all()):
                raise AssertionError(f"the plan left query rows of {c} without a visible key")
            bias = additive_mask(visible, dtype).to(device)
        return DeviceLaunch("call", c.causal, c.q, _slice_writes(written, c.q_start, c.q_end),
                            _as_rows(_mapped(kv, step.kv_map), device), _as_rows(_mapped(kv, step.grad_map), device),
                            call=c, bias=bias)
    if launch.kind == "masked":
        q_idx, kv_idx, bias = _mask_bias(launch, dtype, device)
        return DeviceLaunch("masked", False, *_query_rows(written, q_idx, device),
                            _as_rows(_mapped(kv_idx, step.kv_map), device),
                            _as_rows(_mapped(kv_idx, step.grad_map), device), bias=bias)
    q_ranges = [(c.q_start, c.q_end) for c in launch.calls]
    kv_ranges = [(c.kv_start, c.kv_end) for c in launch.calls]
    q_idx, kv_idx = _arange(q_ranges), _arange(kv_ranges)
    cu = lambda ranges: torch.tensor([0, *itertools.accumulate(b - a for a, b in ranges)], dtype=torch.int32)
    return DeviceLaunch("varlen", launch.causal, *_query_rows(written, q_idx, device),
                        _as_rows(_mapped(kv_idx, step.kv_map), device),
                        _as_rows(_mapped(kv_idx, step.grad_map), device),
                        cu_q=cu(q_ranges).to(device), cu_k=cu(kv_ranges).to(device),
                        max_q=max(b - a for a, b in q_ranges), max_k=max(b - a for a, b in kv_ranges))


class PackedOutput:
    """A rank's output ``[S, H, D]`` and LSE ``[H, S]`` in float32, written by the launches' precomputed writes."""

    def __init__(self, q_rows: torch.Tensor) -> None:
        self.out = torch.empty(q_rows.shape, dtype=torch.float32, device=q_rows.device)
        self.lse = torch.empty((q_rows.shape[1], q_rows.shape[0]), dtype=torch.float32, device=q_rows.device)

    def write(self, writes, out: torch.Tensor, lse: torch.Tensor) -> None:
        """``out`` ``[T, H, D]`` and ``lse`` ``[H, T]`` of one launch's packed rows."""
        for first, dst, src in writes:
            o = out if src is None else _take(out, src)
            lo = lse if src is None else _take(lse, src, 1)
            if isinstance(dst, slice):
                if first:
                    self.out[dst].copy_(o)
                    self.lse[:, dst].copy_(lo)
                else:
                    merge_into(self.out[dst], self.lse[:, dst].t(), o, lo.t())
            elif first:
                self.out.index_copy_(0, dst, o.to(torch.float32))
                self.lse.index_copy_(1, dst, lo)
            else:
                cur, cur_lse = self.out.index_select(0, dst), self.lse.index_select(1, dst)
                merge_into(cur, cur_lse.t(), o, lo.t())
                self.out.index_copy_(0, dst, cur)
                self.lse.index_copy_(1, dst, cur_lse)

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [1, H, S, D] in dtype, lse [1, H, S] float32)``."""
        return blocks(self.out).to(dtype), self.lse[None]


def _call_backend(kernels, c: BlockCall) -> Backend:
    if c.kind == "band":
        return kernels.masked
    one = c.q_end - c.q_start == 1 or c.kv_end - c.kv_start == 1
    return kernels.single if one and kernels.single is not None else kernels.plain


class PackedSchedule:
    """A rank's ring steps as device launches (see the module docstring); built by :func:`schedule_for`."""

    def __init__(self, steps: tuple[tuple[DeviceLaunch, ...], ...]) -> None:
        self.steps = steps

    def calls_per_step(self) -> list[int]:
        """Kernel calls of each step (forward; the backward makes as many)."""
        return [len(s) for s in self.steps]

    def forward_step(self, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: PackedOutput,
                     kernels, scale: float) -> None:
        """``q`` ``[S, H, D]`` rows against the K/V source rows ``k``, ``v`` ``[N, Hkv, D]``; merged into ``acc``."""
        for la in self.steps[step]:
            qp, kp, vp = _take(q, la.q_rows), _take(k, la.kv_rows), _take(v, la.kv_rows)
            if la.kind == "varlen":
                out, lse = kernels.varlen.forward(qp, kp, vp, la.cu_q, la.cu_k, la.max_q, la.max_k, la.causal, scale)
            else:
                backend = kernels.plain if la.kind == "masked" else _call_backend(kernels, la.call)
                out, lse = block_forward(backend, blocks(qp), blocks(kp), blocks(vp), la.causal, scale, la.bias)
                out, lse = rows(out), lse[0]
            acc.write(la.writes, out, lse)

    def backward_step(self, step: int, dout, q, k, v, out, lse, dq: torch.Tensor, kernels, scale: float) -> list:
        """The step's backward kernels; ``dout``/``q``/``out`` ``[S, H, D]`` rows, ``lse`` ``[H, S]``; adds into the
        float32 rows ``dq`` and returns ``(accumulator rows, dk, dv)`` per launch for :func:`add_kv_rows`."""
        grads = []
        for la in self.steps[step]:
            qr = la.q_rows
            dop, qp, op = _take(dout, qr), _take(q, qr), _take(out, qr)
            kp, vp, lp = _take(k, la.kv_rows), _take(v, la.kv_rows), _take(lse, qr, 1)
            if la.kind == "varlen":
                bdq, bdk, bdv = kernels.varlen.backward(dop, qp, kp, vp, op, lp, la.cu_q, la.cu_k, la.max_q, la.max_k,
                                                        la.causal, scale)
            else:
                backend = kernels.plain if la.kind == "masked" else _call_backend(kernels, la.call)
                bdq, bdk, bdv = (rows(g) for g in block_backward(
                    backend, blocks(dop), blocks(qp), blocks(kp), blocks(vp), blocks(op), lp[None], la.causal, scale,
                    la.bias))
            _add_rows(dq, qr, bdq)
            grads.append((la.kv_grad, bdk, bdv))
        return grads


def _add_rows(acc: torch.Tensor, index: Rows, x: torch.Tensor) -> None:
    if isinstance(index, slice):
        acc[index] += x
    else:
        acc.index_add_(0, index, x.to(acc.dtype))


def add_kv_rows(grads: list, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Add :meth:`PackedSchedule.backward_step`'s K/V gradients into the float32 rows ``dk``, ``dv`` ``[N, Hkv, D]``."""
    for index, bdk, bdv in grads:
        _add_rows(dk, index, bdk)
        _add_rows(dv, index, bdv)


def build_schedule(steps: list[Step], mode: str, n_rows: int, device, dtype) -> PackedSchedule | None:
    """The launches of ``steps`` (in the order a rank runs them) on ``device``; ``None`` when no step has more than
    two calls (then the rank runs its calls one by one, on row slices)."""
    launches = [step_launches(s.calls, mode) for s in steps]
    if all(la.kind == "call" for step in launches for la in step):
        return None
    written = torch.zeros(n_rows, dtype=torch.bool)
    out = tuple(tuple(_device_launch(la, s, written, device, dtype) for la in step)
                for s, step in zip(steps, launches))
    if not bool(written.all()):
        raise AssertionError("query rows attended to no key; the block plan is incomplete")
    return PackedSchedule(out)


def packed_mode(kernels) -> str | None:
    """``"varlen"`` (a varlen kernel: CUDA), ``"masked"`` (a kernel that takes masks: the CPU) or ``None``."""
    if kernels.varlen is not None:
        return "varlen"
    return "masked" if kernels.plain.masks else None


_CACHE: dict[tuple, tuple[object, object]] = {}


def cached_on(owner: object, key: tuple, build: Callable[[], object]) -> object:
    """``build()`` once per ``owner`` (by identity: one :class:`~hf_ringcp.ring.layout.Placement` serves every layer
    of a batch, so nothing is hashed per layer but ``key``) and ``key``; the last 256 are kept."""
    k = (id(owner), key)
    hit = _CACHE.get(k)
    if hit is not None and hit[0] is owner:
        return hit[1]
    value = build()
    if len(_CACHE) >= 256:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[k] = (owner, value)
    return value
