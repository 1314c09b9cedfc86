"""The sharded cache stores decode tokens in place (pre-allocated, amortised growth), never re-concatenating."""

from __future__ import annotations

import torch

from hf_ringcp.integrations.generation import ShardedCache


def test_decode_tokens_are_written_in_place_and_storage_grows_rarely() -> None:
    cache = ShardedCache(1, None, torch.ones(2, 5, dtype=torch.long))
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(1, 2, 5, 8, generator=g) for _ in range(2)]
    index = torch.arange(5).expand(2, 5) % 5  # both rows hold the 5 prompt tokens of the one shard row
    cache.prompt = (index, torch.ones(2, 5, dtype=torch.bool), torch.arange(5).expand(2, 5), 5)
    layer.update(*kv)
    cache.prompt = None
    storage = layer.keys.data_ptr()
    held = [layer.keys.clone(), layer.values.clone()]
    new = []
    for step in range(1030):  # past the first headroom of 5 + 1024 columns
        k, v = (torch.randn(2, 2, 1, 8, generator=g) for _ in range(2))
        layer.update(k, v)
        out = layer.attend(torch.randn(2, 4, 1, 8, generator=g), torch.tensor([[5 + step]]), None, None)
        assert out.shape == (2, 1, 4, 8)
        new.append((k, v))
        if step == 1023:
            assert layer.keys.data_ptr() == storage  # no copy while the headroom lasts
    assert layer.keys.data_ptr() != storage and layer.keys.shape[2] == 5 + 1030
    assert torch.equal(layer.keys[:, :, :5], held[0]) and torch.equal(layer.values[:, :, :5], held[1])
    assert torch.equal(layer.keys[:, :, 5:], torch.cat([k for k, _ in new], 2))
    assert torch.equal(layer.positions[0], torch.arange(5 + 1030)) and bool(layer.valid.all())
    assert cache.local_tokens() == 2 * (5 + 1030)
