"""Which kernel calls one rank makes for one block of keys/values.

The sequence is cut into equal chunks (see :mod:`hf_ringcp.ring.layout`). A rank's queries are some chunks;
a buffer of keys/values holds some chunks. Under a causal mask query chunk ``i`` sees key chunk ``j`` fully
when ``j < i``, through the lower triangle when ``j == i`` and not at all when ``j > i``. The planner turns
that chunk-level picture into as few rectangular kernel calls as it can: whole causal squares where the two
chunk lists are the same, and unmasked rectangles merged over neighbouring query chunks that see the same run
of key chunks. Hidden blocks produce no call.

A later per-block mask (packed documents) attaches to :class:`BlockCall`, which names the chunks it covers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local query rows ``[q_start, q_end)`` against buffer rows ``[kv_start, kv_end)``.

    ``causal`` means a square block on the diagonal of the global sequence (lower-triangular mask).
    ``q_chunks`` / ``kv_chunks`` are the global chunk indices it covers.
    """

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    causal: bool
    q_chunks: tuple[int, ...]
    kv_chunks: tuple[int, ...]

    @property
    def q(self) -> slice:
        return slice(self.q_start, self.q_end)

    @property
    def kv(self) -> slice:
        return slice(self.kv_start, self.kv_end)


def plan_block(
    q_chunks: tuple[int, ...],
    kv_chunks: tuple[int, ...],
    chunk_len: int,
    causal: bool,
    skip_kv: frozenset[int] = frozenset(),
) -> list[BlockCall]:
    """Kernel calls for the local queries (global ``q_chunks``, in local order) against a K/V buffer.

    ``kv_chunks`` are the global chunk indices held by the buffer, in buffer order; chunks in ``skip_kv`` are
    in the buffer but must not be attended to here (they were handled separately).
    """
    if causal and q_chunks == kv_chunks and not skip_kv:
        n = len(q_chunks) * chunk_len
        return [BlockCall(0, n, 0, n, True, q_chunks, kv_chunks)]

    # Per query chunk: runs of consecutive buffer chunks it sees fully, and its diagonal chunk if any.
    runs: dict[tuple[int, int], list[int]] = {}
    diagonal: list[BlockCall] = []
    for a, i in enumerate(q_chunks):
        start = None
        for b, j in enumerate((*kv_chunks, None)):
            full = j is not None and j not in skip_kv and (not causal or j < i)
            if full and start is None:
                start = b
            elif not full and start is not None:
                runs.setdefault((start, b), []).append(a)
                start = None
            if causal and j == i and j not in skip_kv:
                diagonal.append(
                    BlockCall(a * chunk_len, (a + 1) * chunk_len, b * chunk_len, (b + 1) * chunk_len, True, (i,), (j,))
                )

    calls = []
    for (b0, b1), rows in runs.items():
        group = [rows[0]]
        for a in rows[1:] + [None]:
            if a is not None and a == group[-1] + 1:
                group.append(a)
                continue
            calls.append(
                BlockCall(
                    group[0] * chunk_len, (group[-1] + 1) * chunk_len, b0 * chunk_len, b1 * chunk_len, False,
                    tuple(q_chunks[g] for g in group), kv_chunks[b0:b1],
                )
            )
            if a is not None:
                group = [a]
    return diagonal + calls
