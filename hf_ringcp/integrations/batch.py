"""What happens to a batch under context parallelism: documents, padding, labels, sharding and counting.

:func:`shard_batch` turns the full batch every rank of a CP group holds into this rank's share:

0. **The same batch.** Every rank of the group must hold the same batch; one all-gather of a few fingerprints
   (:func:`verify_same_batch`) checks it first, so a data loader split over all ranks (instead of over the
   data-parallel groups) ends in a clear error on every rank, not in a silently wrong loss, a hang or an abort.
1. **Documents.** A row's documents are read from ``position_ids`` (a restart at 0 starts a document, as
   ``DataCollatorWithFlattening`` and TRL's padding-free collator write them) or from ``cu_seq_lens_q``.
2. **Padding becomes packing.** Tokens with ``attention_mask == 0`` are dropped and every row becomes a document
   of one packed row, so no compute is spent on padding; rows of several documents that differ between rows
   are packed the same way. Plain rows (one document each, no padding) stay rows.
3. **Labels.** ``labels`` are shifted per row before anything moves (``shift_labels``): the last token of a
   document never predicts the next document's first token, and nothing predicts or is predicted by padding.
4. **Any length.** Each document is padded to the layout's divisor (``2P`` for zigzag, which balances every
   document on its own; the whole row for the other layouts): the padding sits at the end of its document, is
   attended by no real token and has label ``-100``.
5. **Sharding.** Every per-token tensor is split in the layout; the entry :data:`SHARD_KEY` carries the
   documents to the ``"ring"`` attention (as a model keyword argument).

:func:`count_targets` counts the loss targets of sharded micro-batches over a group (the ``N`` of the exact
global token mean); :func:`unshard_predictions` puts per-token model outputs back into the batch's own
``[B, S, ...]`` order.
"""

from __future__ import annotations

import itertools
import logging
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hf_ringcp.integrations.context import resolve_group
from hf_ringcp.ring import Layout, Placement, unshard_sequence
from hf_ringcp.ring.group import all_gather_single, collective_device, group_rank_and_size

IGNORE_INDEX = -100
#: The batch entry (and model keyword argument) that carries a :class:`ShardInfo` to the attention.
SHARD_KEY = "cp_shard"
# Entries that describe packed documents in the flash-attention convention (local to an unsharded row).
_PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
# The entries whose fingerprints every rank of a CP group compares (verify_batch): what decides the shards' shapes,
# the documents and the targets.
_VERIFIED_KEYS = ("input_ids", "inputs_embeds", "labels", "shift_labels", "attention_mask", "position_ids",
                  "cu_seq_lens_q")
_FINGERPRINT_DIMS = 3  # leading dimensions of each entry's shape in its fingerprint
_FINGERPRINT_FEATURES = 16  # features per token of an entry with more than two dimensions (inputs_embeds)
# The attribute that marks the `attention_mask` tensor shard_batch returns (see is_shard_mask).
_SHARD_MASK_MARK = "_hf_ringcp_shard_mask"

logger = logging.getLogger("hf_ringcp")
_logged_padding = False


class ShardInfo:
    """How a full batch was turned into this rank's shard; passed to the model so the ring sees the documents.

    Attributes:
        placement: the layout's :class:`~hf_ringcp.ring.Placement` of the (packed, padded) global rows.
        rank: this rank in the CP group.
        rows: rows of the model input (``B``, or 1 when the batch was packed into one row).
        source_shape: ``(B, S)`` of the full batch.
        source_index: ``[rows, seq_len]`` int64, the flat index into ``B * S`` of every global token, ``-1`` for
            added padding; ``None`` when the rows are the batch's rows (only padded at the end).
        added: padding tokens added per row.
        position_check: a fingerprint of this rank's ``position_ids`` (catches a shard run on another rank).
        mask: ``[rows, S_local]`` bool, the shard's ``attention_mask`` (True on real tokens), or ``None``. The
            ``"ring"`` attention checks the padding mask its model was given against it: the zeros it accepts are
            this shard's padding, which the documents keep unattended.
    """

    __slots__ = ("added", "mask", "placement", "position_check", "rank", "rows", "source_index", "source_shape")

    def __init__(self, placement: Placement, rank: int, rows: int, source_shape: tuple[int, int],
                 source_index: torch.Tensor | None, added: int, position_check: tuple[int, int],
                 mask: torch.Tensor | None = None) -> None:
        self.placement, self.rank, self.rows, self.source_shape = placement, rank, rows, source_shape
        self.source_index, self.added, self.position_check, self.mask = source_index, added, position_check, mask

    @property
    def layout(self) -> str:
        return self.placement.layout

    @property
    def documents(self) -> tuple[int, ...] | None:
        return self.placement.documents

    def local_padding(self) -> int:
        """Padding tokens among this rank's tokens (all rows)."""
        local = self.placement.positions(self.rank)
        if self.source_index is not None:
            return int((self.source_index[:, local.to(self.source_index.device)] < 0).sum())
        return int((local >= self.source_shape[1]).sum()) * self.rows

    def __repr__(self) -> str:
        docs = self.documents
        shown = "one document per row" if docs is None else f"{len(docs) - 1} documents"
        return (f"ShardInfo(layout={self.layout!r}, rank={self.rank} of {self.placement.world}, rows={self.rows}, "
                f"seq_len={self.placement.seq_len}, {shown}, added={self.added})")


def position_fingerprint(position_ids: torch.Tensor) -> tuple[int, int]:
    pos = position_ids.reshape(-1).to(torch.int64)
    weights = torch.arange(1, pos.numel() + 1, device=pos.device)
    return int(pos.sum()), int((pos * weights).sum())


# ------------------------------------------------------------------------------------------- validation


def _describe(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__


def _sequence_tensor(batch: Mapping[str, Any]) -> torch.Tensor:
    for name in ("input_ids", "inputs_embeds"):
        x = batch.get(name)
        if x is not None:
            if not torch.is_tensor(x) or x.dim() < 2:
                raise ValueError(f"`{name}` must be a tensor of shape [batch, seq, ...], but got {_describe(x)}.")
            return x
    raise ValueError(f"shard_batch needs `input_ids` or `inputs_embeds`; the batch has keys {sorted(batch)}.")


def _padding_mask(mask: Any, b: int, s: int) -> torch.Tensor | None:
    """The 2-D padding mask as bool (``None`` when it masks nothing)."""
    if mask is None:
        return None
    if not torch.is_tensor(mask) or tuple(mask.shape) != (b, s):
        raise ValueError(
            f"`attention_mask` must be a 2-D [batch, seq] = [{b}, {s}] padding mask under context parallelism, "
            f"but got {_describe(mask)}; drop custom 4-D masks (the ring applies the causal and document masks "
            "itself)."
        )
    keep = mask.bool()
    if not bool(keep.any(dim=1).all()):
        raise ValueError("`attention_mask` has a row of padding only; drop empty rows from the batch.")
    return None if bool(keep.all()) else keep


def _positions(pos: Any, b: int, s: int, device: torch.device) -> torch.Tensor | None:
    if pos is None:
        return None
    rows_ok = torch.is_tensor(pos) and (pos.dim() == 1 or (pos.dim() == 2 and pos.shape[0] in (1, b)))
    if not rows_ok or pos.shape[-1] != s:
        raise ValueError(f"`position_ids` must be [batch, seq] = [{b}, {s}] (or [seq]), but got {_describe(pos)}.")
    return pos.to(device=device, dtype=torch.int64).reshape(-1, s).expand(b, s)


def _label_tensor(name: str, x: Any, b: int, s: int) -> torch.Tensor:
    if not torch.is_tensor(x) or tuple(x.shape) != (b, s):
        raise ValueError(f"`{name}` must be [batch, seq] = [{b}, {s}], but got {_describe(x)}.")
    return x


def shift_labels_of(labels: torch.Tensor) -> torch.Tensor:
    """``labels[:, 1:]`` padded with ``-100`` at the end: position ``i`` holds the target of the token at ``i``."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _documents_from_cu(cu: Any, cu_k: Any, s: int, b: int) -> list[int]:
    values = [int(x) for x in (cu.reshape(-1).tolist() if torch.is_tensor(cu) else cu)]
    if cu_k is not None:
        other = [int(x) for x in (cu_k.reshape(-1).tolist() if torch.is_tensor(cu_k) else cu_k)]
        if other != values:
            raise ValueError(f"`cu_seq_lens_k` {other} differs from `cu_seq_lens_q` {values}; the ring attends "
                             "within each document, so both must describe the same documents.")
    rising = all(y > x for x, y in itertools.pairwise(values))
    if b != 1 or len(values) < 2 or values[0] != 0 or values[-1] != s or not rising:
        raise ValueError(
            f"`cu_seq_lens_q` must rise from 0 to the row length ({s}) over one packed row (batch size 1), but got "
            f"{values} for a batch of {b} rows."
        )
    return values[:-1]


def _row_documents(pos: torch.Tensor, row: int) -> list[int]:
    """Starts (indices into ``pos``) of the documents of one row's kept tokens, from restarting positions."""
    breaks = (pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1
    restarts = pos[breaks]
    if bool((restarts != 0).any()):
        i = int(breaks[(restarts != 0).nonzero()[0, 0]])
        raise ValueError(
            f"`position_ids` of row {row} jump from {int(pos[i - 1])} to {int(pos[i])} at token {i}: positions must "
            "count up by one inside a document and restart at 0 where a new document starts (as "
            "DataCollatorWithFlattening writes them). Fix the collator, or drop `position_ids` for plain rows."
        )
    return [0, *breaks.tolist()]


# ------------------------------------------------------------------------------------ the same batch


def _entry_fingerprint(x: Any, device: torch.device) -> torch.Tensor:
    """``[present, ndim, dim0, dim1, dim2, sum, weighted sum]`` of one batch entry, int64 on ``device``.

    The sums wrap around identically on every rank, which is all a fingerprint needs; floating-point values enter
    by their bits (as float64), and entries of more than two dimensions (``inputs_embeds``) by
    ``_FINGERPRINT_FEATURES`` evenly spaced features of every token (different samples differ in all of them), so
    the copy stays small and no reduction depends on summation order.
    """
    if x is None:
        return torch.zeros(4 + _FINGERPRINT_DIMS, dtype=torch.int64, device=device)
    if not torch.is_tensor(x):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            crc = zlib.crc32(repr(x).encode())
            return torch.tensor([2] + [0] * (1 + _FINGERPRINT_DIMS) + [crc, 0], dtype=torch.int64, device=device)
    dims = [*x.shape[:_FINGERPRINT_DIMS]] + [-1] * (_FINGERPRINT_DIMS - min(x.dim(), _FINGERPRINT_DIMS))
    head = torch.tensor([1, x.dim(), *dims], dtype=torch.int64, device=device)
    if x.dim() > 2:
        x = x.flatten(2)
        x = x[..., :: -(-x.shape[-1] // _FINGERPRINT_FEATURES)]
    if x.is_floating_point():
        x = x.to(torch.float64).contiguous().view(torch.int64)
    flat = x.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device)
    return torch.cat([head, torch.stack([flat.sum(), (flat * weights).sum()]).to(device)])


def verify_same_batch(batch: Any, group: dist.ProcessGroup | None, settings: Mapping[str, Any] | None = None) -> None:
    """Raise on every rank unless every rank of ``group`` holds the same batch (and the same ``settings``).

    One all-gather of a few int64 per entry (shape and two checksums of ``input_ids`` / ``inputs_embeds``,
    ``labels``, ``shift_labels``, ``attention_mask``, ``position_ids``, ``cu_seq_lens_q``). It runs before anything
    that could fail on some ranks only or exchange tensors whose shapes differ between ranks (which hangs or aborts
    the process), so different batches end in the same clear error on every rank. A no-op for a group of one.

    Args:
        batch: the full batch (``[B, S]`` entries; ``inputs_embeds`` ``[B, S, H]``).
        group: the context-parallel group (``None``: the default group).
        settings: arguments that must agree too (e.g. ``shard_batch``'s ``layout``), by name.

    Raises:
        ValueError: the ranks hold different batches (a sampler or data loader split over all ranks instead of
            over the data-parallel groups) or were given different ``settings``.
    """
    _, world = group_rank_and_size(group)
    if world == 1:
        return
    settings = dict(settings or {})
    device = collective_device(group)
    items = batch if isinstance(batch, Mapping) else {}
    kind = torch.tensor([isinstance(batch, Mapping), zlib.crc32(repr(sorted(settings.items())).encode())],
                        dtype=torch.int64, device=device)
    mine = torch.cat([kind, *(_entry_fingerprint(items.get(k), device) for k in _VERIFIED_KEYS)])
    every = mine.new_empty(world * mine.numel())
    all_gather_single(every, mine, group=group)
    every = every.view(world, -1).cpu()
    same = (every == every[0]).all(dim=0)
    if bool(same.all()):
        return
    if bool(same[0]) and bool(same[2:].all()):
        raise ValueError(
            f"shard_batch: the ranks of the context-parallel group were given different arguments (one of "
            f"{', '.join(f'`{k}`' for k in settings)}); pass the same on every rank (e.g. from one "
            "ContextParallelPlugin, or the `layout` given to context_parallel)."
        )
    width = 4 + _FINGERPRINT_DIMS
    found = []
    if not bool(same[0]):
        found.append("a batch that is not a dict on some ranks")
    for i, key in enumerate(_VERIFIED_KEYS):
        part = every[:, 2 + i * width: 2 + (i + 1) * width]
        if bool(same[2 + i * width: 2 + (i + 1) * width].all()):
            continue
        shapes = [_shape_of(row.tolist()) for row in part]
        found.append(f"`{key}` of shapes {', '.join(f'{s} on rank {r}' for r, s in enumerate(shapes))}"
                     if len(set(shapes)) > 1 else f"`{key}` of shape {shapes[0]} with different values")
    raise ValueError(
        f"shard_batch: the {world} ranks of the context-parallel group hold different batches ({'; '.join(found)}). "
        "Every rank of a CP group must get the same full batch, which it then shards: the sampler or data loader is "
        "split over all ranks instead of over the data-parallel groups. Prepare the data loader with "
        "ContextParallelPlugin.prepare(accelerator, model, optimizer, loader) (Accelerate's prepare_data_loader then "
        "gives every CP rank the same batches), train with the Trainer and RingCPCallback, or split the data by DP "
        "group yourself (e.g. DistributedSampler(dataset, num_replicas=plugin.dp_size, rank=plugin.dp_rank))."
    )


def _shape_of(fingerprint: list[int]) -> str:
    present, ndim, dims = fingerprint[0], fingerprint[1], fingerprint[2: 2 + _FINGERPRINT_DIMS]
    if present != 1:
        return "absent" if present == 0 else "given"
    return str(dims[: min(ndim, _FINGERPRINT_DIMS)]).replace("]", ", ...]" if ndim > _FINGERPRINT_DIMS else "]")


# ---------------------------------------------------------------------------------------------- padding


def pad_batch_to_multiple(batch: Mapping[str, Any], multiple: int, pad_token_id: int = 0) -> dict[str, Any]:
    """Pad every ``[B, S, ...]`` tensor of a batch at the end of its rows to a multiple of ``multiple`` tokens.

    ``labels`` become ``shift_labels`` first (so the last real token keeps its target), and the padding gets label
    ``-100``, ``pad_token_id`` as its id, 0 in ``attention_mask`` and 0 elsewhere. Nothing real attends to tokens
    at the end of a row under a causal mask, so the padding changes no real token's result.
    """
    items = dict(batch.items())
    b, s = _sequence_tensor(items).shape[:2]
    pad = (-s) % multiple
    if pad == 0:
        return items
    if "labels" in items and "shift_labels" not in items:
        items["shift_labels"] = shift_labels_of(_label_tensor("labels", items.pop("labels"), b, s))
    for key, value in list(items.items()):
        if not (torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[:2]) == (b, s)):
            continue
        fill = {"labels": IGNORE_INDEX, "shift_labels": IGNORE_INDEX, "input_ids": pad_token_id}.get(key, 0)
        items[key] = torch.cat([value, value.new_full((b, pad, *value.shape[2:]), fill)], dim=1)
    return items


def _log_padding_once(added: int, rows: int, seq_len: int) -> None:
    global _logged_padding
    if added and not _logged_padding:
        _logged_padding = True
        logger.warning(
            "hf_ringcp: added %d padding token(s) (%d row(s) of %d tokens) so that the batch splits over the "
            "context-parallel ranks; padding is attended by no real token and has no labels. (Logged once.)",
            added, rows, seq_len,
        )


# ------------------------------------------------------------------------------------------ shard_batch


def _pack(
    per_token: dict[str, torch.Tensor], shifted: torch.Tensor | None, positions: torch.Tensor, keep: torch.Tensor,
    starts_per_row: list[list[int]], split: Layout, pad_token_id: int, max_position: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor, list[int], torch.Tensor, int]:
    """Flatten the kept tokens of every row into one row of documents, each padded as the layout needs."""
    b, s = keep.shape
    device = keep.device
    documents = []
    for row in range(b):
        kept = keep[row].nonzero().flatten() + row * s
        starts = [*starts_per_row[row], len(kept)]
        documents += [kept[a:z] for a, z in itertools.pairwise(starts)]
    pieces, bounds, cursor = [], [0], 0
    for doc, span in zip(documents, split.document_spans([len(d) for d in documents])):
        pieces += [doc, torch.full((span - len(doc),), -1, dtype=torch.long, device=device)]
        cursor += span
        bounds.append(cursor)
    source = torch.cat(pieces)
    real_max = int(positions.reshape(-1)[source[source >= 0]].max())
    if real_max < max_position and not bool((source < 0).any()):
        # Position-dependent RoPE must see the unsharded batch's maximum position: carry it on padding.
        source = torch.cat([source, torch.full((split.divisor,), -1, dtype=torch.long, device=device)])
        cursor += split.divisor
        bounds.append(cursor)
    real = source >= 0
    index = source.clamp(min=0)

    def take(x: torch.Tensor, fill) -> torch.Tensor:
        flat = x.reshape(b * s, *x.shape[2:]).index_select(0, index)
        flat[~real] = fill
        return flat.unsqueeze(0)

    packed = {k: take(v, pad_token_id if k == "input_ids" else 0) for k, v in per_token.items()}
    new_shifted = None if shifted is None else take(shifted, IGNORE_INDEX)
    new_pos = take(positions, 0)
    if real_max < max_position:
        new_pos[0, (~real).nonzero()[0, 0]] = max_position
    return packed, new_shifted, new_pos, bounds, source.unsqueeze(0), int((~real).sum())


@dataclass
class _FullBatch:
    """A full batch between the stages of :func:`shard_batch` (``B`` rows of ``S`` tokens on ``device``)."""

    b: int
    s: int
    device: torch.device
    per_token: dict[str, torch.Tensor]  # every other [B, S, ...] tensor (input_ids or inputs_embeds among them)
    others: dict[str, Any]  # entries passed through untouched
    had_mask: bool  # an `attention_mask` was given (the shard then gets one too)
    keep: torch.Tensor | None  # [B, S] bool: the real tokens; None when nothing is padding
    positions: torch.Tensor | None  # [B, S] int64 position_ids as given (None: not given)
    shifted: torch.Tensor | None  # [B, S] shift_labels (None: no labels)
    cu: Any = None  # cu_seq_lens_q / _k as given (packed documents of one row)
    cu_k: Any = None


@dataclass
class _LaidOut:
    """The batch in the layout's rows: ``rows`` of ``seq_len`` tokens that split over the ranks."""

    per_token: dict[str, torch.Tensor]  # [rows, seq_len, ...]
    positions: torch.Tensor  # [rows, seq_len] RoPE positions
    shifted: torch.Tensor | None  # [rows, seq_len]
    rows: int
    seq_len: int
    documents: list[int] | None  # document bounds of the packed row (None: plain rows)
    source: torch.Tensor | None  # [1, seq_len] flat index into B * S, -1 for padding (None: plain rows)
    added: int  # padding tokens added per row


def _read_entries(batch: Mapping[str, Any]) -> _FullBatch:
    """Stage 1: check and normalise the entries (mask as bool, positions as int64, ``labels`` -> ``shift_labels``)."""
    items = dict(batch.items())
    seq = _sequence_tensor(items)
    b, s = seq.shape[:2]
    had_mask = items.get("attention_mask") is not None
    keep = _padding_mask(items.pop("attention_mask", None), b, s)
    positions = _positions(items.pop("position_ids", None), b, s, seq.device)
    cu, cu_k = items.pop("cu_seq_lens_q", None), items.pop("cu_seq_lens_k", None)
    for key in _PACKING_KEYS[2:]:
        items.pop(key, None)
    labels, shifted = items.pop("labels", None), items.pop("shift_labels", None)
    if shifted is None and labels is not None:
        shifted = shift_labels_of(_label_tensor("labels", labels, b, s))
    if shifted is not None:
        shifted = _label_tensor("shift_labels", shifted, b, s)
    per_token = {k: v for k, v in items.items() if torch.is_tensor(v) and v.dim() >= 2 and tuple(v.shape[:2]) == (b, s)}
    others = {k: v for k, v in items.items() if k not in per_token}
    return _FullBatch(b, s, seq.device, per_token, others, had_mask, keep, positions, shifted, cu, cu_k)


def _find_documents(full: _FullBatch) -> list[list[int]]:
    """Stage 2: the documents of every row, as starts among the row's kept tokens (sets ``full.positions``)."""
    b, s, device, keep = full.b, full.s, full.device, full.keep
    if full.cu is not None:
        if keep is not None:
            raise ValueError("The batch has both `cu_seq_lens_q` (packed documents) and padding in `attention_mask`;"
                             " pass one of them.")
        cu_starts = _documents_from_cu(full.cu, full.cu_k, s, b)
        from_cu = torch.cat([torch.arange(e - a, device=device) for a, e in zip(cu_starts, [*cu_starts[1:], s])])
        if full.positions is not None and not torch.equal(full.positions[0], from_cu):
            raise ValueError(
                f"`cu_seq_lens_q` {[*cu_starts, s]} disagrees with `position_ids` (which restart at "
                f"{_row_documents(full.positions[0], 0)}); fix the collator so both describe the same documents."
            )
        full.positions = from_cu[None]
    if full.positions is None:
        full.positions = torch.arange(s, device=device).expand(b, s)
    return [_row_documents(full.positions[row] if keep is None else full.positions[row][keep[row]], row)
            for row in range(b)]


def _mask_targets(full: _FullBatch, starts_per_row: list[list[int]]) -> None:
    """Stage 3: targets never cross a document boundary, nor come from or go to padding (on a copy of them)."""
    if full.shifted is None:
        return
    keep = full.keep
    shifted = full.shifted.clone()
    if keep is not None:
        nxt = F.pad(keep[:, 1:], (0, 1), value=False)
        shifted[~keep | ~nxt] = IGNORE_INDEX
    for row, starts in enumerate(starts_per_row):
        kept = keep[row].nonzero().flatten() if keep is not None else None
        for a in starts[1:]:
            prev = int(kept[a - 1]) if kept is not None else a - 1
            shifted[row, prev] = IGNORE_INDEX
    full.shifted = shifted


def _lay_out(full: _FullBatch, starts_per_row: list[list[int]], split: Layout, pad_to_multiple: bool,
             pad_token_id: int) -> _LaidOut:
    """Stage 4: plain rows padded at their end to the layout's divisor; anything else (padding, documents that
    differ between rows) packed into one row of documents, each padded as the layout needs."""
    b, s, keep = full.b, full.s, full.keep
    if keep is None and all(len(st) == 1 for st in starts_per_row):
        seq_len = split.padded_length(s) if pad_to_multiple else s
        split.check_length(seq_len)
        entries = {**full.per_token, "position_ids": full.positions, "shift_labels": full.shifted}
        if seq_len != s:
            entries = pad_batch_to_multiple(entries, seq_len, pad_token_id)
        return _LaidOut({k: v for k, v in entries.items() if k in full.per_token}, entries["position_ids"],
                        entries["shift_labels"], b, seq_len, None, None, seq_len - s)
    if keep is None:
        keep = torch.ones(b, s, dtype=torch.bool, device=full.device)
    per_token, shifted, positions, bounds, source, added = _pack(
        full.per_token, full.shifted, full.positions, keep, starts_per_row, split, pad_token_id,
        int(full.positions.max()),
    )
    if not pad_to_multiple and added:
        raise ValueError(
            f"The packed documents need {added} padding token(s) to split over the ranks (layout={split.name!r} "
            f"needs lengths divisible by {split.divisor_hint()}); leave pad_to_multiple on."
        )
    return _LaidOut(per_token, positions, shifted, 1, bounds[-1], bounds, source, added)


def _split_for_rank(full: _FullBatch, laid: _LaidOut, split: Layout, rank: int) -> dict[str, Any]:
    """Stage 5: this rank's tokens of every per-token entry, the :class:`ShardInfo` the attention needs and the
    mask of the shard's real tokens."""
    rows, seq_len, device = laid.rows, laid.seq_len, full.device
    placement = split.placement(seq_len, laid.documents)
    local = placement.positions(rank, device)
    out: dict[str, Any] = {k: v.index_select(1, local) for k, v in laid.per_token.items()}
    out.update(full.others)
    out["position_ids"] = laid.positions.index_select(1, local).contiguous()
    if laid.shifted is not None:
        out["shift_labels"] = laid.shifted.index_select(1, local)
    standard = laid.documents is None and laid.added == 0 and torch.equal(
        laid.positions, torch.arange(seq_len, device=device).expand(rows, seq_len))
    mask = None
    if full.had_mask or not standard:
        # The real tokens of the shard (counted by e.g. TRL's `num_tokens`); the ring keeps padding unattended.
        real = (laid.source >= 0 if laid.source is not None
                else torch.arange(seq_len, device=device).expand(rows, -1) < full.s)
        mask = out["attention_mask"] = real.index_select(1, local).contiguous()
        setattr(mask, _SHARD_MASK_MARK, True)
    if not standard:
        out[SHARD_KEY] = ShardInfo(placement, rank, rows, (full.b, full.s), laid.source, laid.added,
                                   position_fingerprint(out["position_ids"]), mask)
    return out


def shard_batch(
    batch: Mapping[str, Any], group: dist.ProcessGroup | None = None, layout: str = "zigzag", *,
    pad_to_multiple: bool = True, pad_token_id: int = 0, verify_batch: bool = True,
) -> dict[str, Any]:
    """This rank's share of a full causal-LM batch, ready for ``model(**out)`` inside ``context_parallel``.

    Every rank of the context-parallel group must pass the same full batch (checked first, see ``verify_batch``).
    Plain rows, packed rows (``DataCollatorWithFlattening``, TRL's padding-free collator: ``position_ids``
    restarting at 0, optionally ``cu_seq_lens_q/k``, ``max_length_q/k``, ``seq_idx``) and padded rows
    (``attention_mask`` with zeros, left or right, ``B > 1``) all work; see the module docstring for what is done
    to them.

    Args:
        batch: a dict or ``BatchEncoding`` with ``input_ids`` ``[B, S]`` (or ``inputs_embeds`` ``[B, S, H]``),
            optionally ``labels`` ``[B, S]`` (unshifted, as for ``model(labels=...)``) or ``shift_labels``
            (already shifted; then ``labels`` is ignored), ``attention_mask`` ``[B, S]``, ``position_ids``.
        group: the context-parallel group; ``None`` is the group of the active
            :func:`~hf_ringcp.context_parallel`, else the default group (a world of 1 without torch.distributed).
        layout: a name from :data:`hf_ringcp.ring.LAYOUTS`; must match :func:`~hf_ringcp.context_parallel`'s.
        pad_to_multiple: pad to the layout's divisor (default); ``False`` raises for lengths that do not split.
        pad_token_id: the id given to padding tokens.
        verify_batch: check that every rank of ``group`` passed the same batch and arguments
            (:func:`verify_same_batch`: one all-gather of a few int64, before anything that could hang or abort
            on a mismatch); ``False`` skips it where the batch is known to be the same.

    Returns:
        A new dict: ``input_ids`` ``[R, S_local]`` (or ``inputs_embeds``) with ``R = B`` for plain rows and 1 when
        the batch was packed; ``position_ids`` (RoPE positions: each token's position in its document);
        ``shift_labels`` (the target of each local token, shifted before sharding); every other ``[B, S, ...]``
        tensor sharded the same way; other entries passed through; when the batch has documents, padding or
        non-standard positions, :data:`SHARD_KEY` (a :class:`ShardInfo` for the attention); and, when the batch
        had an ``attention_mask`` or was padded or packed, a bool ``attention_mask`` ``[R, S_local]`` that is True
        on the real tokens (the ring never attends the padding; trainers count real tokens with it). ``labels``
        and the packing entries are consumed.

    Raises:
        ValueError: a mask that is not a 2-D padding mask, positions that neither count up nor restart at 0,
            ``cu_seq_lens`` that disagree with the positions, mis-shaped labels, (``pad_to_multiple=False``) a
            length that does not split, or (``verify_batch``) ranks of the group that hold different batches: a
            sampler or data loader not split by data-parallel group.
    """
    group = resolve_group(group)
    if verify_batch:  # first: on the same batch every check below fails on all ranks or on none
        verify_same_batch(batch, group, {"layout": layout, "pad_to_multiple": pad_to_multiple,
                                         "pad_token_id": pad_token_id})
    if not isinstance(batch, Mapping):
        raise TypeError(f"`batch` must be a dict or BatchEncoding, but got {type(batch).__name__}.")
    rank, world = group_rank_and_size(group)
    split = Layout.for_name(layout, world)
    full = _read_entries(batch)
    starts_per_row = _find_documents(full)
    _mask_targets(full, starts_per_row)
    laid = _lay_out(full, starts_per_row, split, pad_to_multiple, pad_token_id)
    _log_padding_once(laid.added * laid.rows, laid.rows, laid.seq_len)
    return _split_for_rank(full, laid, split, rank)


def is_shard_mask(mask: Any) -> bool:
    """Whether ``mask`` is the ``attention_mask`` tensor :func:`shard_batch` returned (marked on the tensor itself;
    a copy, e.g. by ``.to(other_device)``, is not: the attention then checks it against the shard's
    :attr:`ShardInfo.mask` by value)."""
    return getattr(mask, _SHARD_MASK_MARK, False) is True


# ----------------------------------------------------------------------------------------------- counting


def local_targets(sharded_batch: Mapping[str, Any]) -> int:
    """Loss targets (``shift_labels != -100``) in one rank's shard."""
    labels = sharded_batch.get("shift_labels")
    if labels is None:
        raise ValueError(
            "The batch has no `labels` (nor `shift_labels`), so there is nothing to train on: the model cannot "
            f"return a loss from the inputs it received ({', '.join(sorted(sharded_batch))}). Use a collator that "
            "adds labels, e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False) or DataCollatorWithFlattening()."
        )
    return int((labels != IGNORE_INDEX).sum())


def count_targets(sharded_batches: Iterable[Mapping[str, Any]], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The number of loss targets of the given shards summed over ``group`` (``None``: every rank).

    Returns a float64 scalar on the collective device: the ``N`` of the global token mean (pass every
    micro-batch of a gradient-accumulation step to count the whole step).
    """
    total = torch.tensor(float(sum(local_targets(b) for b in sharded_batches)), dtype=torch.float64,
                         device=collective_device(group))
    if dist.is_initialized():
        dist.all_reduce(total, group=group)
    return total


# --------------------------------------------------------------------------------------- predictions


def unshard_predictions(
    local: torch.Tensor, info: ShardInfo | None, group: dist.ProcessGroup | None, layout: str
) -> torch.Tensor:
    """Per-token outputs of a shard (``[R, S_local, ...]``, e.g. logits) -> ``[B, S, ...]`` in the batch's order.

    Every rank returns the same tensor (one all-gather). Positions the batch padded (and the packed-away padding of
    the input) hold zeros. ``info``: the shard's :data:`SHARD_KEY` entry (``None`` for a plain batch, whose rows and
    length are unchanged).
    """
    docs = None if info is None else info.documents
    full = unshard_sequence(local, 1, group, layout, cu_seqlens=docs)
    if info is None:
        return full
    b, s = info.source_shape
    if info.source_index is None:
        return full[:, :s]
    src = info.source_index.reshape(-1).to(full.device)
    real = src >= 0
    out = full.new_zeros((b * s, *full.shape[2:]))
    out[src[real]] = full.reshape(-1, *full.shape[2:])[real]
    return out.reshape(b, s, *full.shape[2:])
