"""hf_ringcp.context_parallel: validation, nesting, and a setting visible from every thread."""

from __future__ import annotations

import dataclasses
import threading

import pytest

import hf_ringcp
from hf_ringcp.integrations.context import RingContext, get_context


def test_no_context_outside_the_block() -> None:
    assert get_context() is None
    with hf_ringcp.context_parallel(layout="contiguous", comm="allgather", backend="math") as ctx:
        assert get_context() is ctx
        got = (ctx.layout, ctx.comm, ctx.backend, ctx.rank, ctx.world_size)
        assert got == ("contiguous", "allgather", "math", 0, 1)
        assert ctx.group is None and not ctx.cp_enabled
    assert get_context() is None


def test_nesting_restores_the_outer_setting_even_after_an_error() -> None:
    with hf_ringcp.context_parallel(layout="zigzag") as outer:
        with pytest.raises(KeyError):
            with hf_ringcp.context_parallel(layout="contiguous") as inner:
                assert get_context() is inner
                raise KeyError("boom")
        assert get_context() is outer
    assert get_context() is None


def test_setting_is_process_wide_not_per_thread() -> None:
    # The CUDA autograd engine runs backward (and checkpoint recomputation) on its own thread.
    seen = []
    with hf_ringcp.context_parallel(layout="contiguous") as ctx:
        t = threading.Thread(target=lambda: seen.append(get_context()))
        t.start()
        t.join()
    assert seen == [ctx]


def test_context_is_frozen() -> None:
    with hf_ringcp.context_parallel() as ctx, pytest.raises(dataclasses.FrozenInstanceError):
        ctx.layout = "contiguous"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "ring"},
         r"`layout` must be one of \('zigzag', 'zigzag_global', 'balanced', 'contiguous', 'striped'\), but got 'ring'"),
        ({"comm": "nccl"}, r"`comm` must be one of \('p2p', 'allgather', 'ulysses', 'auto'\), but got 'nccl'"),
        ({"backend": "flash2"}, r"`backend` must be one of \('auto', .*'math'\), but got 'flash2'"),
    ],
)
def test_invalid_arguments_name_the_valid_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message), hf_ringcp.context_parallel(**kwargs):
        pass
    assert get_context() is None


def test_dataclass_validates_itself() -> None:
    with pytest.raises(ValueError, match="`layout` must be one of"):
        RingContext(group=None, layout="diagonal", comm="p2p", backend="auto", rank=0, world_size=1)
    assert RingContext(None, "zigzag", "p2p", "auto", 0, 4).seq_divisor == 8
    assert RingContext(None, "contiguous", "p2p", "auto", 0, 4).seq_divisor == 4


def test_group_without_torch_distributed_is_an_error() -> None:
    with pytest.raises(ValueError, match="init_process_group"), hf_ringcp.context_parallel(object()):
        pass
