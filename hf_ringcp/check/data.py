"""The full batch of a check, the same on every rank: plain, packed or padded, with some labels ignored."""

from __future__ import annotations

import itertools

import torch

from hf_ringcp.check.spec import CheckSpec
from hf_ringcp.integrations.batch import IGNORE_INDEX

ROWS = 2  # plain and padded batches: two rows, so the batch dimension is exercised too


def _document_lengths(total: int, g: torch.Generator) -> list[int]:
    """Up to five uneven documents (random cuts), so documents start and end inside shards and across ranks."""
    count = min(5, total // 2)
    cuts = torch.randperm(total - 1, generator=g)[: count - 1] + 1
    bounds = [0, *sorted(int(c) for c in cuts), total]
    return [b - a for a, b in itertools.pairwise(bounds)]


def make_batch(spec: CheckSpec, vocab_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(full batch, mask of its real tokens [B, S])`` for ``spec``; unshifted ``labels`` as for ``model(labels=)``.

    - plain: two rows, the first five targets of row 0 and the last three of row 1 ignored (target counting);
    - packed: one row of uneven documents, ``position_ids`` restarting at 0 and each document's first label
      ignored, as ``DataCollatorWithFlattening`` writes it;
    - padded: two rows, the second with a third of its tokens padding on the chosen side (labels ignored there,
      and on the first real token with left padding, which the padded model would score from a pad token).
    """
    g = torch.Generator().manual_seed(spec.seed + 1)
    s = spec.seq_len
    if spec.packed:
        lengths = _document_lengths(s, g)
        ids = torch.randint(0, vocab_size, (1, s), generator=g)
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        labels = ids.clone()
        labels[pos == 0] = IGNORE_INDEX
        return {"input_ids": ids, "position_ids": pos, "labels": labels}, torch.ones_like(ids, dtype=torch.bool)
    ids = torch.randint(0, vocab_size, (ROWS, s), generator=g)
    labels = ids.clone()
    if not spec.padded:
        labels[0, : min(5, s // 4)] = IGNORE_INDEX
        labels[1, -min(3, s // 4):] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}, torch.ones_like(ids, dtype=torch.bool)
    pad = max(1, s // 3)
    mask = torch.ones_like(ids)
    mask[1, s - pad:] = 0
    if spec.padded == "left":
        mask = mask.flip(1)
    labels[mask == 0] = IGNORE_INDEX
    if spec.padded == "left":
        labels[1, pad] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, mask.bool()
