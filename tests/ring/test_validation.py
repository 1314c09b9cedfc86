"""Bad input to ring_attention raises ValueError naming the fix."""

from __future__ import annotations

import pytest
import torch

from hf_ringcp.ring import ring_attention, select_backend
from tests.distributed import run_ranks


def _qkv(hq=4, hkv=2, s=8, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, s, d, dtype=dtype, generator=g) for h in (hq, hkv, hkv))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v: (q, k, v[..., :4]), "same shape"),
        (lambda q, k, v: (q[:, :, :4], k, v), "must agree on batch, local sequence length and head_dim"),
        (lambda q, k, v: (q[:, :3], k, v), "multiple of the number of key/value heads"),
        (lambda q, k, v: (q, k.double(), v.double()), "share one dtype"),
        (lambda q, k, v: (q[0], k, v), "must be 4-D"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), "floating point"),
    ],
)
def test_bad_tensors(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        ring_attention(*change(*_qkv()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "diagonal"}, "`layout` must be one of"),
        ({"comm": "alltoall"}, "`comm` must be one of"),
        ({"backend": "triton"}, "`backend` must be one of"),
        ({"backend": "cudnn"}, "cannot run on these inputs.*Use backend='auto'"),
        ({"backend": "flash"}, "CUDA tensors only"),
    ],
)
def test_bad_options(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ring_attention(*_qkv(), **kwargs)


def test_device_mismatch_is_reported() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="one device"):
        ring_attention(q, k, v.to("meta"))


def _odd_local_length(rank: int, world: int) -> str:
    q, k, v = _qkv(s=5)
    with pytest.raises(ValueError, match="divisible by 2 for layout='zigzag'") as info:
        ring_attention(q, k, v)
    ring_attention(q, k, v, layout="contiguous")
    # Bad Ulysses settings name the valid values.
    q, k, v = _qkv(hq=6, hkv=3, s=4)
    with pytest.raises(ValueError, match=r"`ulysses_size` = 3 must divide the CP size \(2\); valid values: \[1, 2\]"):
        ring_attention(q, k, v, ulysses_size=3)
    with pytest.raises(ValueError, match=r"does not split the heads \(6 query, 3 key/value\).*sizes.*\[1, 3, 6\]"):
        ring_attention(q, k, v, comm="ulysses")
    with pytest.raises(ValueError, match=r"comm='ulysses' runs Ulysses over the whole CP group.*ulysses_size=2"):
        ring_attention(q, k, v, comm="ulysses", ulysses_size=2)
    with pytest.raises(ValueError, match=r"`ulysses_size` must be a positive integer"):
        ring_attention(q, k, v, ulysses_size=0)
    return str(info.value)


def test_zigzag_needs_even_local_length() -> None:
    assert "pad the sequence" in run_ranks(_odd_local_length, 2)[0]


def test_auto_backend_on_cpu() -> None:
    q, k, _ = _qkv()
    assert select_backend("auto", q, k).name == "cpu_flash"
    assert select_backend("math", q, k).name == "math"
