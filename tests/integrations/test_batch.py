"""hf_ringcp.shard_batch: plain, packed and padded batches; labels, documents, padding and counting.

One process for the rules; 2 and 3 gloo ranks for the split itself (labels shifted before sharding, every token
on exactly one rank, the global target count).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import BatchEncoding, DataCollatorWithFlattening

import hf_ringcp
from hf_ringcp.integrations.batch import (
    SHARD_KEY,
    count_targets,
    pad_batch_to_multiple,
    shift_labels_of,
    unshard_predictions,
)
from hf_ringcp.ring import Layout, unshard_sequence
from tests.distributed import run_ranks

B, S = 2, 8


def _ids() -> torch.Tensor:
    return torch.arange(B * S).reshape(B, S)


def test_labels_are_shifted_before_sharding_and_positions_are_global() -> None:
    ids = _ids()
    labels = ids.clone()
    labels[0, 2] = -100
    out = hf_ringcp.shard_batch(BatchEncoding({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(B, S)}))
    assert set(out) == {"input_ids", "position_ids", "shift_labels", "attention_mask"}  # labels replaced
    assert out["attention_mask"].dtype == torch.bool and out["attention_mask"].all()  # every token is real
    assert torch.equal(out["input_ids"], ids)
    assert torch.equal(out["position_ids"], torch.arange(S).expand(B, S))
    assert torch.equal(out["shift_labels"][:, :-1], labels[:, 1:])
    assert (out["shift_labels"][:, -1] == -100).all()


def test_given_shift_labels_win_and_per_token_tensors_are_sharded() -> None:
    ids = _ids()
    shifted = torch.full((B, S), 7)
    extra = torch.randn(B, S, 3, generator=torch.Generator().manual_seed(0))
    out = hf_ringcp.shard_batch(
        {"input_ids": ids, "labels": ids, "shift_labels": shifted, "token_type_ids": extra, "num_items_in_batch": 5,
         "position_ids": torch.arange(S)}
    )
    assert torch.equal(out["shift_labels"], shifted)
    assert torch.equal(out["token_type_ids"], extra) and out["num_items_in_batch"] == 5


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"input_ids": torch.zeros(B, 7, dtype=torch.long)}, r"length \(7\) must be divisible by 2 \* cp_size = 2"),
        ({"input_ids": _ids(), "attention_mask": torch.ones(B, 1, S, S)}, r"2-D \[batch, seq\].*drop custom 4-D"),
        ({"input_ids": _ids(), "position_ids": torch.tensor([[0, 1, 2, 5, 6, 7, 8, 9]] * B)},
         r"jump from 2 to 5 at token 3.*restart at 0"),
        ({"input_ids": _ids()[:1], "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]),
          "cu_seq_lens_q": torch.tensor([0, 3, 8])}, r"`cu_seq_lens_q` \[0, 3, 8\] disagrees with `position_ids`"),
        ({"input_ids": _ids()[:1], "cu_seq_lens_q": torch.tensor([0, 4, 8]), "cu_seq_lens_k": torch.tensor([0, 5, 8])},
         r"`cu_seq_lens_k` \[0, 5, 8\] differs"),
        ({"input_ids": _ids()[:1], "cu_seq_lens_q": torch.tensor([0, 4, 8]),
          "attention_mask": torch.tensor([[1] * 7 + [0]])}, r"both `cu_seq_lens_q`.*and padding"),
        ({"input_ids": _ids(), "labels": torch.zeros(B, S - 1)}, r"`labels` must be \[batch, seq\]"),
        ({"labels": _ids()}, r"needs `input_ids` or `inputs_embeds`"),
        ({"input_ids": _ids(), "attention_mask": torch.tensor([[0] * S, [1] * S])}, r"row of padding only"),
    ],
)
def test_rejected_batches(batch: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hf_ringcp.shard_batch(batch, pad_to_multiple=False)


def test_contiguous_layout_needs_only_cp_divisibility_and_names_layout() -> None:
    out = hf_ringcp.shard_batch({"input_ids": torch.zeros(1, 7, dtype=torch.long)}, layout="contiguous")
    assert out["input_ids"].shape == (1, 7)
    with pytest.raises(ValueError, match="`layout` must be one of"):
        hf_ringcp.shard_batch({"input_ids": _ids()}, layout="diagonal")


def test_odd_lengths_are_padded_by_default() -> None:
    ids = torch.arange(7)[None]
    out = hf_ringcp.shard_batch({"input_ids": ids, "labels": ids}, pad_token_id=99)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 99]]
    assert out["shift_labels"].tolist() == [[1, 2, 3, 4, 5, 6, -100, -100]]
    info = out[SHARD_KEY]
    assert info.added == 1 and info.documents is None and info.local_padding() == 1
    assert out["attention_mask"].tolist() == [[True] * 7 + [False]]  # the padding is marked


def _flattened(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = [{"input_ids": torch.randint(0, 50, (n,), generator=g).tolist()} for n in lengths]
    return DataCollatorWithFlattening(return_tensors="pt")(features)


def test_packed_rows_keep_documents_apart() -> None:
    batch = _flattened([3, 5, 1])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    out = hf_ringcp.shard_batch(batch)  # one rank: zigzag pads each document to a multiple of 2
    info = out[SHARD_KEY]
    assert info.documents == (0, 4, 10, 12)
    ids, pos, shifted = (out[k][0].tolist() for k in ("input_ids", "position_ids", "shift_labels"))
    raw = batch["input_ids"][0].tolist()
    assert ids == raw[:3] + [0] + raw[3:8] + [0] + raw[8:] + [0]
    assert pos == [0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 0, 0]
    # The collator puts -100 at each document start; no target crosses a document or comes from padding.
    assert shifted == [raw[1], raw[2], -100, -100, raw[4], raw[5], raw[6], raw[7], -100, -100, -100, -100]


def test_restarting_positions_alone_define_documents() -> None:
    ids = torch.arange(6)[None]
    out = hf_ringcp.shard_batch({"input_ids": ids, "labels": ids, "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])})
    # Labels without -100 at the document start: the last token of the first document still predicts nothing.
    assert out["shift_labels"][0].tolist() == [1, 2, -100, -100, 4, 5, -100, -100]
    assert out[SHARD_KEY].documents == (0, 4, 8)


@pytest.mark.parametrize("labels_on_padding", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_becomes_packing(side: str, labels_on_padding: bool) -> None:
    ids = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    if side == "left":
        ids, mask = ids.flip(1), mask.flip(1)
    # labels = input_ids.clone() writes the pad id on the padding: the last real token must not learn to predict it.
    labels = ids.clone() if labels_on_padding else torch.where(mask.bool(), ids, -100)
    out = hf_ringcp.shard_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
    info = out[SHARD_KEY]
    assert info.rows == 1 and info.documents == (0, 6, 10)  # the pad tokens are gone; rows are documents
    real = [t for t in out["input_ids"][0].tolist() if t]
    assert sorted(real) == sorted(ids[mask.bool()].tolist())
    # RoPE positions are the padded model's own (arange over the padded row).
    second = out["position_ids"][0, 6:9].tolist()
    assert second == ([0, 1, 2] if side == "right" else [3, 4, 5])
    targets = out["shift_labels"][0].tolist()
    assert sum(t != -100 for t in targets) == 5 + 2  # each row's tokens but its last; nothing from padding
    # The padded row's document: each real token predicts the next real one; its last real token predicts nothing.
    assert targets[6:10] == [*ids[1][mask[1].bool()][1:].tolist(), -100, -100]


def _split_case(rank: int, world: int) -> dict:
    results = {}
    packed = _flattened([3, 2 * world + 1, 5, 1], seed=1)
    packed["labels"] = packed["input_ids"].clone()
    plain = {"input_ids": torch.arange(3 * 2 * world).reshape(3, 2 * world) + 1}
    plain["labels"] = plain["input_ids"].clone()
    plain["labels"][0, 1] = -100
    odd = {"input_ids": torch.arange(2 * 7).reshape(2, 7) + 1}
    odd["labels"] = odd["input_ids"].clone()
    padded = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]]),
              "attention_mask": torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])}
    padded["labels"] = torch.where(padded["attention_mask"].bool(), padded["input_ids"], -100)
    for name, batch in {"packed": packed, "plain": plain, "odd": odd, "padded": padded}.items():
        for layout in ("zigzag", "contiguous", "striped"):
            single = _one_rank_reference(batch, layout, world)
            out = hf_ringcp.shard_batch(batch, layout=layout)
            info = out.get(SHARD_KEY)
            docs = None if info is None else info.documents
            got = {k: unshard_sequence(out[k], 1, layout=layout, cu_seqlens=docs)
                   for k in ("input_ids", "shift_labels")}
            n = count_targets([out])
            back = unshard_predictions(out["input_ids"][..., None], info, None, layout)
            results[(name, layout)] = {
                "same_tokens_and_labels": all(torch.equal(got[k], single[k]) for k in got),
                "count": int(n) == int((single["shift_labels"] != -100).sum()),
                "local_tokens": out["input_ids"].shape[1] * world == single["input_ids"].shape[1],
                "predictions_in_batch_order": torch.equal(
                    back[..., 0], torch.where(batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool(),
                                              batch["input_ids"], 0)),
            }
    return results


def _one_rank_reference(batch: dict, layout: str, world: int) -> dict:
    """The global rows shard_batch must split (built by hand): plain rows padded at the end, others packed."""
    split = Layout.for_name(layout, world)
    if "attention_mask" in batch or "position_ids" in batch:
        return _packed_reference(batch, split)
    n = split.padded_length(batch["input_ids"].shape[1])
    return pad_batch_to_multiple({"input_ids": batch["input_ids"], "shift_labels": shift_labels_of(batch["labels"])}, n)


def _packed_reference(batch: dict, split) -> dict:
    """Documents padded one by one (zigzag) or the row at the end (other layouts), built by hand."""
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    pos = batch.get("position_ids")
    docs = []
    for row in range(ids.shape[0]):
        kept = mask[row].nonzero().flatten()
        starts = [0] + [i for i in range(1, len(kept)) if pos is not None and int(pos[row, kept[i]]) == 0]
        for a, z in zip(starts, [*starts[1:], len(kept)]):
            docs.append(kept[a:z] + row * ids.shape[1])
    flat_ids, flat_labels = ids.reshape(-1), labels.reshape(-1)
    out_ids, out_labels = [], []
    for d in docs:
        tokens = flat_ids[d].tolist()
        targets = [*flat_labels[d[1:]].tolist(), -100]
        n = split.padded_length(len(tokens)) if split.per_document else len(tokens)
        out_ids += tokens + [0] * (n - len(tokens))
        out_labels += targets + [-100] * (n - len(tokens))
    n = split.padded_length(len(out_ids))
    out_ids += [0] * (n - len(out_ids))
    out_labels += [-100] * (n - len(out_labels))
    return {"input_ids": torch.tensor([out_ids]), "shift_labels": torch.tensor([out_labels])}


@pytest.mark.parametrize("world", [2, 3])
def test_split_over_ranks_loses_nothing(world: int) -> None:
    for rank, results in enumerate(run_ranks(_split_case, world)):
        for case, checks in results.items():
            assert all(checks.values()), f"rank {rank} {case}: {checks}"


# ------------------------------------------------------------------------- every rank holds the same batch


def _different_batches(rank: int, world: int) -> dict[str, str]:
    """shard_batch on ranks given different batches: the error each rank raised (``"ok"`` when it returned)."""
    from hf_ringcp.integrations.plugin import ContextParallelPlugin

    g = torch.Generator().manual_seed(rank)  # a different sample on each rank, as an unsplit sampler gives
    cases = {
        "same_shape": lambda **kw: {"input_ids": torch.randint(0, 50, (2, 8), generator=g), **kw},
        "labels_only": lambda **kw: {"input_ids": _ids(), "labels": _ids() + rank, **kw},
        "lengths": lambda **kw: {"input_ids": torch.zeros(1, 8 + 4 * rank, dtype=torch.long),
                                 "attention_mask": torch.ones(1, 8 + 4 * rank, dtype=torch.long), **kw},
        "packed_documents": lambda **kw: {**_flattened([3, 5] if rank == 0 else [5, 3]), **kw},
        "embeds": lambda **kw: {"inputs_embeds": torch.randn(1, 8, 40, generator=g), **kw},
        "settings": lambda **kw: {"input_ids": _ids(), **kw},
        "same": lambda **kw: {"input_ids": _ids(), "labels": _ids(), **kw},
    }
    results = {}
    for name, make in cases.items():
        layout = "contiguous" if name == "settings" and rank == 1 else "zigzag"
        try:
            hf_ringcp.shard_batch(make(), layout=layout)
            results[name] = "ok"
        except ValueError as e:
            results[name] = str(e)
    # The opt-out: the same different batches shard without a collective (the caller vouches for them).
    out = hf_ringcp.shard_batch(cases["same_shape"](), verify_batch=False)
    results["opt_out"] = "ok" if out["input_ids"].shape == (2, 8 // world) else "wrong shard"
    results["plugin"] = _try(lambda: ContextParallelPlugin(cp_size=world).shard(cases["same_shape"]()))
    results["plugin_opt_out"] = _try(lambda: ContextParallelPlugin(cp_size=world, verify_batch=False).shard(
        cases["same_shape"]()))
    os.environ["HF_RINGCP_VERIFY_BATCH"] = "0"
    results["plugin_env_opt_out"] = _try(lambda: ContextParallelPlugin(cp_size=world).shard(cases["same_shape"]()))
    return results


def _try(fn) -> str:
    try:
        fn()
        return "ok"
    except ValueError as e:
        return str(e)


def test_different_batches_on_the_ranks_fail_on_every_rank_with_the_cause() -> None:
    # Unchecked, equal shapes train on a mix of samples and different lengths abort a rank inside the ring.
    for rank, results in enumerate(run_ranks(_different_batches, 2, timeout=120)):
        assert results["same"] == "ok" and results["opt_out"] == "ok", results
        for case in ("same_shape", "labels_only", "lengths", "packed_documents", "embeds", "plugin"):
            message = results[case]
            assert "hold different batches" in message, f"rank {rank} {case}: {message}"
            assert "sampler or data loader" in message and "data-parallel groups" in message
            assert "ContextParallelPlugin.prepare" in message and "RingCPCallback" in message
        assert "`input_ids` of shape [2, 8] with different values" in results["same_shape"]
        assert "`input_ids`" not in results["labels_only"] and "`labels` of shape [2, 8]" in results["labels_only"]
        assert "`input_ids` of shapes [1, 8] on rank 0, [1, 12] on rank 1" in results["lengths"]
        assert "`attention_mask` of shapes" in results["lengths"]
        assert "`position_ids` of shape [1, 8] with different values" in results["packed_documents"]
        assert "`inputs_embeds` of shape [1, 8, 40] with different values" in results["embeds"]
        assert "were given different arguments (one of `layout`, `pad_to_multiple`" in results["settings"]
        assert results["plugin_opt_out"] == "ok" and results["plugin_env_opt_out"] == "ok"  # verify_batch=False
