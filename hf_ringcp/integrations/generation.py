"""Generation under context parallelism: the prompt through the ring, decoding over a sharded KV cache.

:func:`generate` runs on every rank of the group with the same prompt:

1. **Prefill.** All prompt columns but the last are sharded by :func:`hf_ringcp.shard_batch` (padding dropped,
   the layout's divisor padded) and run through the ring inside :func:`hf_ringcp.context_parallel`. Every
   layer's :class:`ShardedCache` layer keeps *this rank's* keys and values, regrouped per batch row, with each
   key's row position and validity; nothing is replicated.
2. **Decode.** Transformers' own ``model.generate`` continues from that cache (it feeds the last prompt column
   first). In each step the cache stores the new tokens' keys and values on one rank, round-robin (so cache
   memory stays balanced), and the ``"ring"`` attention function computes every query's partial attention
   over the local keys and merges the group's partials by log-sum-exp
   (:func:`hf_ringcp.ring.decode.decode_attention`): one small all-gather per layer and step.

Every rank computes the same logits, and the ranks share one random state for the step (rank 0's), so greedy
search and sampling give the same tokens on every rank.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, CacheLayerMixin

from hf_ringcp.integrations.batch import SHARD_KEY, shard_batch
from hf_ringcp.integrations.context import context_parallel, get_context, resolve_group
from hf_ringcp.integrations.decoding import decoding
from hf_ringcp.integrations.hf_attention import check_ring_config
from hf_ringcp.integrations.models import causal_lm, check_ring_model, prepare_model, unwrap
from hf_ringcp.ring import local_positions
from hf_ringcp.ring.decode import decode_attention
from hf_ringcp.ring.group import all_gather_single, collective_device, global_rank, group_rank_and_size

# generate() arguments that cannot work over a sharded cache, with what to do instead.
_REFUSED = {
    "num_beams": (lambda v: v is not None and v > 1, "beam search (`num_beams > 1`)"),
    "num_beam_groups": (lambda v: v is not None and v > 1, "group beam search (`num_beam_groups > 1`)"),
    "penalty_alpha": (lambda v: v is not None and v > 0, "contrastive search (`penalty_alpha`)"),
    "assistant_model": (lambda v: v is not None, "assisted decoding (`assistant_model`)"),
    "prompt_lookup_num_tokens": (lambda v: v is not None, "prompt-lookup decoding (`prompt_lookup_num_tokens`)"),
    "assistant_early_exit": (lambda v: v is not None, "self-speculative decoding (`assistant_early_exit`)"),
    "dola_layers": (lambda v: v is not None, "DoLa decoding (`dola_layers`)"),
    "prefill_chunk_size": (lambda v: v is not None, "chunked prefill (`prefill_chunk_size`; the ring prefills)"),
    "cache_implementation": (lambda v: v is not None, "`cache_implementation` (the cache is the sharded one; if "
                             "the model's generation_config sets it, set model.generation_config.cache_implementation "
                             "= None)"),
    "output_attentions": (lambda v: bool(v), "`output_attentions` (the ring computes no attention weights)"),
    "output_hidden_states": (lambda v: bool(v), "`output_hidden_states` (the prompt's hidden states stay sharded)"),
    "max_time": (lambda v: v is not None, "`max_time` (a wall-clock limit would stop the ranks at different steps "
                 "and leave the others waiting; use max_new_tokens)"),
    "custom_generate": (lambda v: v is not None, "`custom_generate`"),
}
_ARGUMENTS = ("past_key_values", "cache", "inputs_embeds", "position_ids")


# ------------------------------------------------------------------------------------------------ the cache


class _ShardedLayer(CacheLayerMixin):
    """One layer's share of the cache: ``keys``/``values`` ``[B, Hkv, N, D]``, ``positions``/``valid`` ``[B, N]``.

    ``length`` counts the sequence columns the layer has seen on all ranks together (what Transformers calls
    the cache's sequence length); ``N`` is what this rank holds (about ``length / P``). The four are views of the
    first ``N`` columns of pre-allocated storage that grows by an eighth (at least 1024 columns) when full, so a
    decode step writes its token in place instead of re-concatenating the cache.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: ShardedCache) -> None:
        super().__init__()
        self.cache = cache
        self.length = 0
        self.steps = 0
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._store: list[torch.Tensor] = []  # keys, values [B, H, capacity, D]; positions, valid [B, capacity]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hkv, _, d = key_states.shape
        rows = self.cache.batch_size_hint or b
        self.keys = key_states.new_zeros((rows, hkv, 0, d))
        self.values = value_states.new_zeros((rows, hkv, 0, value_states.shape[-1]))
        self.positions = torch.zeros((rows, 0), dtype=torch.long, device=key_states.device)
        self.valid = torch.zeros((rows, 0), dtype=torch.bool, device=key_states.device)
        self._store = [self.keys, self.values, self.positions, self.valid]
        self.device = key_states.device
        self.is_initialized = True

    @staticmethod
    def _headroom(n: int) -> int:
        return n + max(1024, n // 8)

    def _append(self, parts: list[torch.Tensor]) -> None:
        """Write ``keys``, ``values`` ``[B, H, L, D]``, ``positions``, ``valid`` ``[B, L]`` after the held columns."""
        n, add = self.keys.shape[2], parts[0].shape[2]
        held = (self.keys, self.values, self.positions, self.valid)
        if n + add > self._store[0].shape[2]:  # full: grow once by an eighth (amortised), keep the held columns
            cap = self._headroom(n + add)
            grown = []
            for old, x in zip(self._store, held):
                if old.dim() == 4:
                    new = old.new_empty((old.shape[0], old.shape[1], cap, old.shape[3]))
                    new[:, :, :n] = x
                else:
                    new = old.new_empty((old.shape[0], cap))
                    new[:, :n] = x
                grown.append(new)
            self._store = grown
        for store, x in zip(self._store, parts):
            (store[:, :, n : n + add] if store.dim() == 4 else store[:, n : n + add]).copy_(x)
        self._views(n + add)

    def _views(self, n: int) -> None:
        k, v, pos, valid = self._store
        self.keys, self.values, self.positions, self.valid = k[:, :, :n], v[:, :, :n], pos[:, :n], valid[:, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        prompt = self.cache.prompt
        if prompt is not None:  # the prefill: this rank's shard of the prompt, regrouped per batch row
            index, valid, positions, columns = prompt
            self._store = [_rows(x, index, self._headroom(index.shape[1])) for x in (key_states, value_states)]
            for x in (positions, valid):
                store = x.new_empty((x.shape[0], self._store[0].shape[2]))
                store[:, : x.shape[1]] = x
                self._store.append(store)
            self._views(index.shape[1])
            self.length = columns
        else:  # a decode step: stored by attend(), which knows the tokens' positions
            self.pending = (key_states, value_states)
        return key_states, value_states

    def attend(self, query: torch.Tensor, positions: torch.Tensor, window: int | None, scale: float | None
               ) -> torch.Tensor:
        """The decode step's attention (``query`` ``[B, Hq, L, D]``) over the group's cache -> ``[B, L, Hq, D]``."""
        if self.pending is None:
            raise RuntimeError("hf_ringcp.generate: a layer attended without updating the cache first; this model's "
                               "attention does not follow the Transformers cache protocol.")
        keys, values = self.pending
        self.pending = None
        b, length = query.shape[0], query.shape[2]
        positions = positions.to(self.positions.device).expand(b, length)
        if self.steps % self.cache.world == self.cache.rank:  # round-robin: each new token lives on one rank
            self._append([keys, values, positions, self.cache.column_validity(self.length, length)])
        self.steps += 1
        self.length += length
        if length == 1 and self.cache.all_valid and (window is None or window > self.length):
            # Every held key is an earlier (or this) real token inside the window: no mask, the fused kernel.
            visible = None
        else:
            visible = self.valid[:, None, :] & (self.positions[:, None, :] <= positions[:, :, None])
            if window is not None:
                visible &= positions[:, :, None] - self.positions[:, None, :] < window
        out = decode_attention(query, self.keys, self.values, visible, self.cache.group, scale)
        return out.transpose(1, 2).contiguous()

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name in older Transformers releases
        return -1

    def local_tokens(self) -> int:
        """Keys this rank holds for real tokens (all rows)."""
        return 0 if self.valid is None else int(self.valid.sum())

    def _refuse(self, what: str) -> None:
        raise NotImplementedError(f"hf_ringcp.generate's sharded KV cache does not support {what}.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._refuse("beam search (reordering the cache)")

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse("cropping (assisted or speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("expanding the batch after the prefill")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("selecting batch rows")


def _rows(x: torch.Tensor, index: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[R, H, T, D]`` shard + ``[B, N]`` flat indices into ``R * T`` -> storage ``[B, H, capacity, D]`` holding
    the ``N`` gathered columns first."""
    r, h, t, d = x.shape
    flat = x.transpose(0, 1).reshape(h, r * t, d)
    store = x.new_empty((index.shape[0], h, capacity, d))
    store[:, :, : index.shape[1]] = flat[:, index.reshape(-1)].reshape(h, *index.shape, d).transpose(0, 1)
    return store


class ShardedCache(Cache):
    """A ``transformers.Cache`` whose layers hold this rank's share of the keys and values (see the module doc).

    Built by :func:`generate`; the model's decode loop uses it like any cache. ``local_tokens()`` is the number
    of cached tokens on this rank (about ``1 / P`` of the sequence).
    """

    def __init__(self, num_layers: int, group: dist.ProcessGroup | None, prompt_mask: torch.Tensor) -> None:
        self.group = group
        self.rank, self.world = group_rank_and_size(group)
        self.prompt_mask = prompt_mask.bool()
        #: No padding in the prompt (one host sync per generate): decode steps of one token then need no mask.
        self.all_valid = bool(self.prompt_mask.all())
        self.batch_size_hint = prompt_mask.shape[0]
        self.prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        super().__init__(layers=[_ShardedLayer(self) for _ in range(num_layers)])

    def column_validity(self, start: int, length: int) -> torch.Tensor:
        """``[B, length]``: which of the sequence columns ``start ...`` are real tokens (generated ones all are)."""
        mask = self.prompt_mask
        cols = torch.ones((mask.shape[0], length), dtype=torch.bool, device=mask.device)
        inside = max(0, min(length, mask.shape[1] - start))
        cols[:, :inside] = mask[:, start:start + inside]
        return cols

    def local_tokens(self) -> int:
        """Real tokens cached on this rank (per layer: every layer holds the same tokens)."""
        return self.layers[0].local_tokens()


# ---------------------------------------------------------------------------------------------- generate


def _setting(name: str, kwargs: dict[str, Any], model: torch.nn.Module) -> Any:
    if name in kwargs:
        return kwargs[name]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, name, None)


def _check_arguments(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    for name in _ARGUMENTS:
        if kwargs.get(name) is not None:
            raise ValueError(f"hf_ringcp.generate does not take `{name}`: pass the prompt as `input_ids` (and "
                             "`attention_mask`); the prefill builds the sharded cache.")
    if kwargs.get("use_cache") is False:  # (a model config's use_cache=False, common after training, is overridden)
        raise ValueError("hf_ringcp.generate does not support `use_cache=False`: the prompt lives in the sharded "
                         "KV cache.")
    for name, (refused, what) in _REFUSED.items():
        if refused(_setting(name, kwargs, model)):
            raise ValueError(f"hf_ringcp.generate does not support {what}: the KV cache is sharded over the ranks. "
                             "Use greedy search or sampling (do_sample=True), or model.generate() without context "
                             "parallelism.")


def _fingerprint(t: torch.Tensor) -> list[int]:
    flat = t.reshape(-1).long()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.long, device=flat.device)
    # int64 sums wrap around identically on every rank, which is all a fingerprint needs.
    return [t.dim(), flat.numel(), t.shape[0] if t.dim() else -1, int((flat * weights).sum())]


def _check_same_prompt(input_ids: torch.Tensor, mask: torch.Tensor, settings: dict[str, Any],
                       group: dist.ProcessGroup | None, world: int) -> None:
    """Every rank must hold the same prompt and settings (different ones would mix prompts or stop the ranks at
    different steps); one small all-gather, before any check that could fail on some ranks only."""
    plain = sorted((k, v) for k, v in settings.items() if isinstance(v, (bool, int, float, str, type(None))))
    mine = torch.tensor(_fingerprint(input_ids) + _fingerprint(mask) + [zlib.crc32(repr(plain).encode())],
                        dtype=torch.long, device=collective_device(group))
    every = mine.new_empty(world * mine.numel())
    all_gather_single(every, mine, group=group)
    every = every.view(world, -1)
    if not bool((every == every[0]).all()):
        raise ValueError("hf_ringcp.generate: the ranks of the context-parallel group were given different prompts "
                         "(or attention masks, or generate() settings); pass every rank the same full `input_ids` "
                         "and arguments.")


def _left_padded(mask: torch.Tensor) -> None:
    real = mask.bool()
    if not bool(real.any(dim=1).all()):
        raise ValueError("hf_ringcp.generate: `attention_mask` has a row of padding only; drop empty prompts.")
    # Left padding: once a row's real tokens start, they do not stop.
    started = real.cumsum(dim=1) > 0
    if bool((started & ~real).any()):
        raise ValueError("hf_ringcp.generate: the prompts are right-padded (or have holes); pad them on the left, "
                         "as for any batched generate() (tokenizer.padding_side = 'left').")


def _prompt_rows(shard: dict[str, Any], rows: torch.Tensor, columns: int, batch: int, layout: str, rank: int,
                 world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per batch row, which of the shard's flat tokens it holds: ``(index, valid, positions)``, each ``[B, N]``.

    ``rows``: the batch rows that went into the prefill (those with real tokens in its columns).
    """
    r, t = shard["input_ids"].shape
    device = shard["input_ids"].device
    info = shard.get(SHARD_KEY)
    if info is not None and info.source_index is not None:  # packed: the flat index of every token's source
        src = info.source_index.to(device)[:, info.placement.positions(rank, device)]
        owner = torch.where(src >= 0, src // columns, -1)
    else:  # plain rows, padded at the end at most
        local = (info.placement.positions(rank, device) if info is not None
                 else local_positions(t * world, layout, rank, world, device=device))
        owner = torch.where(local[None] < columns, torch.arange(r, device=device)[:, None], -1)
    flat_owner = owner.reshape(-1)
    flat_pos = shard["position_ids"].reshape(-1)
    per_row = [(flat_owner == i).nonzero().flatten() for i in range(len(rows))]
    n = max((len(p) for p in per_row), default=0)
    index = torch.zeros((batch, n), dtype=torch.long, device=device)
    valid = torch.zeros((batch, n), dtype=torch.bool, device=device)
    for i, picked in enumerate(per_row):
        index[rows[i], : len(picked)] = picked
        valid[rows[i], : len(picked)] = True
    positions = torch.where(valid, flat_pos[index], 0)
    return index, valid, positions


@contextmanager
def _shared_random_state(group: dist.ProcessGroup | None, model_device: torch.device) -> Iterator[None]:
    """Run the block with rank 0's random state on every rank (so sampling agrees); restore the others' after.

    The CPU generator and, for a model on a GPU, that GPU's (the one its sampling draws from, which need not
    be the current device).
    """
    cuda = model_device if model_device.type == "cuda" else None
    with torch.random.fork_rng(devices=[cuda] if cuda is not None else []):
        device = collective_device(group)
        src = global_rank(group, 0)
        states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(cuda)] if cuda is not None else [])
        shared = []
        for state in states:
            buffer = state.to(device)
            dist.broadcast(buffer, src=src, group=group)
            shared.append(buffer.cpu())
        torch.set_rng_state(shared[0])
        if cuda is not None:
            torch.cuda.set_rng_state(shared[1], cuda)
        yield
        kept = (torch.get_rng_state(), torch.cuda.get_rng_state(cuda) if cuda is not None else None)
    if dist.get_rank(group) == 0:  # rank 0's stream advances as it would have without the ring
        torch.set_rng_state(kept[0])
        if cuda is not None:
            torch.cuda.set_rng_state(kept[1], cuda)


def _cache_argument(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache by (``cache`` since Transformers 5.2x, before it
    ``past_key_values``)."""
    params = inspect.signature(unwrap(model, through_peft=True).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def world_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP (``fully_shard`` or ``FullyShardedDataParallel``) shards the model's parameters: then each
    forward all-gathers them over the FSDP group, and every rank of it must run every forward."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def _agree_across_groups(error: ValueError | None) -> None:
    """Under FSDP: one small all-reduce over the default group, so that when one CP group refuses its call every
    group raises, instead of the others waiting in the next parameter all-gather."""
    failed = torch.tensor([0 if error is None else 1], dtype=torch.long, device=collective_device(None))
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is None and int(failed.item()):
        raise ValueError("hf_ringcp.generate: another context-parallel group refused its call (see that rank's "
                         "error); with an FSDP-sharded model every group stops with it.")


def _prefill_forward(model: torch.nn.Module, inputs: dict[str, Any], through_root: bool) -> None:
    """One forward over ``inputs`` whose logits are not needed (generate() scores the last prompt column).

    ``through_root``: through the model's own ``__call__`` (FSDP's hooks all-gather the root's parameters there,
    the embeddings and head included), keeping only the last column's logits where the model allows; else the
    decoder alone.
    """
    if not through_root:
        causal_lm(model).get_decoder()(**inputs)
        return
    params = inspect.signature(unwrap(model, through_peft=True).forward).parameters
    model(**inputs, **({"logits_to_keep": 1} if "logits_to_keep" in params else {}))


def generate(
    model: torch.nn.Module, input_ids: torch.Tensor, *, group: dist.ProcessGroup | None = None,
    layout: str = "zigzag", comm: str = "p2p", attention_mask: torch.Tensor | None = None, **generate_kwargs: Any,
) -> Any:
    """``model.generate`` with the prompt sharded over the context-parallel group and a sharded KV cache.

    Call it on every rank of ``group`` with the same prompt and arguments (checked). Greedy search and sampling
    work (with ``max_new_tokens``, ``eos_token_id``, stop strings, logits processors, ``pad_token_id``, batches;
    custom stopping criteria must decide from the tokens alone, so that every rank stops at the same step);
    beam search, assisted/speculative and contrastive decoding and ``max_time`` are refused by name.

    With an FSDP-sharded model (``fully_shard`` over the default group, e.g. ``fsdp="full_shard"`` in the
    Trainer) every rank of the world must call it together, each CP group with its own prompt: the ranks step
    together until every group is done (``synced_gpus``), as the parameter all-gathers need.

    Args:
        model: a causal LM loaded with ``attn_implementation="ring"`` (possibly peft-wrapped).
        input_ids: ``[B, S]`` the full prompt, any ``S``, the same on every rank.
        group: the context-parallel group (``None``: the default group; a world of 1 is plain ``model.generate``).
        layout, comm: how the prompt is split and how the prefill's ring passes K/V (see
            :func:`hf_ringcp.context_parallel`).
        attention_mask: ``[B, S]`` for left-padded batches (``tokenizer.padding_side = "left"``).
        **generate_kwargs: passed to ``model.generate``.

    Returns:
        What ``model.generate`` returns, e.g. ``[B, S + new]`` token ids: the same on every rank.
    """
    check_ring_model(model)
    if get_context() is not None and get_context().ring_active:
        raise RuntimeError("hf_ringcp.generate shards the prompt itself: call it outside hf_ringcp.context_parallel.")
    group = resolve_group(group)
    rank, world = group_rank_and_size(group)
    # FSDP: every rank of the world takes part in each forward's parameter all-gathers, but the CP groups decode
    # their own prompts and stop at different steps. As transformers' synced_gpus does, every rank then steps
    # until all are done (a finished group runs forwards whose tokens are dropped), and a group without a prefill
    # runs a forward anyway.
    synced = world_sharded(model)
    if synced and generate_kwargs.get("synced_gpus") is False:
        raise ValueError("hf_ringcp.generate: `synced_gpus=False` with an FSDP-sharded model would leave the ranks "
                         "that stop first out of the others' parameter all-gathers (a hang); drop the argument.")
    if synced:
        generate_kwargs["synced_gpus"] = True
    if world == 1:
        return model.generate(input_ids, attention_mask=attention_mask, **generate_kwargs)
    if not torch.is_tensor(input_ids):
        raise ValueError(f"`input_ids` must be a [batch, seq] tensor, got {type(input_ids).__name__}.")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    error = None
    try:
        _check_same_prompt(input_ids, mask, generate_kwargs, group, world)  # first: the checks below are unanimous
        _check_arguments(model, generate_kwargs)
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be a [batch, seq] tensor, got shape {tuple(input_ids.shape)}.")
        if tuple(mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"`attention_mask` {tuple(mask.shape)} must have the shape of `input_ids` "
                             f"{tuple(input_ids.shape)}.")
        _left_padded(mask)
        copies = _setting("num_return_sequences", generate_kwargs, model) or 1
        if copies > 1 and not _setting("do_sample", generate_kwargs, model):
            raise ValueError("hf_ringcp.generate: `num_return_sequences > 1` needs do_sample=True (greedy search "
                             "would return the same sequence each time).")
        prepare_model(model)
        config = unwrap(model, through_peft=True).config.get_text_config(decoder=True)
        check_ring_config(config)  # also when the prompt is one token and no prefill (nor its mask function) runs
    except ValueError as err:
        error = err
    if synced:
        _agree_across_groups(error)
    if error is not None:
        raise error
    if copies > 1:  # expanded before the prefill, as generate() would (rows repeated in place)
        input_ids, mask = input_ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
        generate_kwargs["num_return_sequences"] = 1

    cache = ShardedCache(config.num_hidden_layers, group, mask)
    cache_arg = _cache_argument(model)
    columns = input_ids.shape[1] - 1  # the last column is generate()'s first step
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    rows = mask[:, :columns].bool().any(dim=1).nonzero().flatten()
    with _shared_random_state(group, next(model.parameters()).device), torch.no_grad():
        if len(rows):
            prompt = {"input_ids": input_ids[rows, :columns], "attention_mask": mask[rows, :columns],
                      "position_ids": positions[rows, :columns]}
            with context_parallel(group, layout=layout, comm=comm):
                shard = shard_batch(prompt, group, layout, verify_batch=False)  # _check_same_prompt did
                index, valid, pos = _prompt_rows(shard, rows, columns, input_ids.shape[0], layout, rank, world)
                cache.prompt = (index, valid, pos, columns)
                try:
                    _prefill_forward(model, {**shard, cache_arg: cache, "use_cache": True}, through_root=synced)
                finally:
                    cache.prompt = None
        elif synced:  # a one-token prompt: nothing to prefill, but the other groups' prefills all-gather
            _prefill_forward(model, {"input_ids": input_ids[:1, -1:], "use_cache": False}, through_root=True)
        for layer in cache.layers:
            layer.length = columns
        with decoding(cache):
            generate_kwargs["use_cache"] = True
            return model.generate(input_ids, attention_mask=mask, **{cache_arg: cache}, **generate_kwargs)
