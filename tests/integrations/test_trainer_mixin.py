"""RingCPTrainerMixin: the callback changes one member of its Trainer (the class), nothing global; families."""

from __future__ import annotations

import pytest
from transformers import Trainer

from hf_ringcp import RingCPCallback, RingCPTrainerMixin
from hf_ringcp.integrations.trainer_mixin import SUPPORTED, family_mixin
from tests.integrations.tiny import samples as _samples
from tests.integrations.tiny import tiny_lora_llama
from tests.integrations.tiny import trainer_args as _args

_TRAINER_METHODS = ("compute_loss", "get_batch_samples", "prediction_step", "evaluation_loop", "log",
                    "training_step", "_prepare_context_parallel_inputs")


def _trainer(tmp_path, callbacks, cls=Trainer) -> Trainer:
    return cls(model=tiny_lora_llama("ring"), args=_args(str(tmp_path)), train_dataset=_samples(4, 0),
               eval_dataset=_samples(2, 1), callbacks=callbacks)


def test_the_callback_changes_only_the_class_of_its_trainer(tmp_path) -> None:
    before = {name: vars(Trainer)[name] for name in _TRAINER_METHODS}
    ring = _trainer(tmp_path, [RingCPCallback(cp_size=1)])
    plain = _trainer(tmp_path, [])
    assert type(plain) is Trainer and isinstance(ring, RingCPTrainerMixin) and type(ring).__bases__[1] is Trainer
    assert {name: vars(Trainer)[name] for name in _TRAINER_METHODS} == before  # no class of transformers changed
    # The same instance members as a plain Trainer's, with the same values where they are plain settings.
    assert set(vars(ring)) == set(vars(plain))
    for name in ("model_accepts_loss_kwargs", "gather_function"):
        assert type(vars(ring)[name]) is type(vars(plain)[name]), name
    assert type(_trainer(tmp_path, [RingCPCallback(cp_size=1)])) is type(ring)  # one subclass per class
    assert not hasattr(type(plain.accelerator), "_ringcp_gather")
    # The plain Trainer still trains and evaluates the stock way, beside the ring one.
    plain.train()
    assert "eval_loss" in plain.evaluate()


class _Mine(RingCPTrainerMixin, Trainer):
    pass


def test_the_mixin_is_usable_directly(tmp_path) -> None:
    trainer = _trainer(tmp_path, [RingCPCallback(cp_size=1)], cls=_Mine)
    assert type(trainer) is _Mine
    trainer.train()
    assert trainer.evaluate()["eval_loss"] > 0
    with pytest.raises(RuntimeError, match=r"no RingCPCallback.*callbacks=\[RingCPCallback"):
        _trainer(tmp_path, [], cls=_Mine).ring_cp  # noqa: B018


def test_an_unsupported_trainer_family_is_refused_naming_the_supported_ones() -> None:
    trl = pytest.importorskip("trl")
    with pytest.raises(ValueError, match=r"does not support trl\.RewardTrainer.*trl\.SFTTrainer, trl\.DPOTrainer"):
        family_mixin(trl.RewardTrainer)
    assert "trl.GRPOTrainer" in SUPPORTED

    class OwnLoss(Trainer):
        def compute_loss(self, *args, **kwargs):
            raise AssertionError

    with pytest.raises(RuntimeError, match=r"overrides compute_loss.*custom_compute_loss=True"):
        family_mixin(OwnLoss)
    assert family_mixin(OwnLoss, custom_compute_loss=True) is RingCPTrainerMixin
