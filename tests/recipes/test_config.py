"""recipes/config.py: `--help`, and recipe values typed from the RecipeConfig annotations (YAML and overrides)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from recipes.config import RecipeConfig, load_recipe, parse_overrides

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "recipes/embedded-passkey-2k.yaml"
FIELDS = dataclasses.fields(RecipeConfig)


def _load(*argv: str) -> RecipeConfig:
    return load_recipe(EMBEDDED, parse_overrides(list(argv)))


def _flat(text: str) -> str:
    return " ".join(text.split())


def _conforms(value, tp) -> bool:
    """Strictly of the annotation ``tp``: an int is not a float, a bool is not an int."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_conforms(value, alt) for alt in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return type(value) is list and all(_conforms(v, typing.get_args(tp)[0]) for v in value)
    if typing.get_origin(tp) is dict:
        return type(value) is dict
    return tp is typing.Any or type(value) is tp


# ------------------------------------------------------------------------------------------------- --help


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--max_steps", "3", "-h"], ["--help", "--seq_len=128"]])
def test_help_prints_usage_and_every_key_then_exits_0(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_overrides(argv)
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "accelerate launch --config_file recipes/accelerate/<cfg>.yaml recipes/train_lora.py" in out
    assert "--config recipes/<recipe>.yaml [--key value ...]" in out
    flat = _flat(out)
    for f in FIELDS:
        assert re.search(rf"^  --{f.name} {re.escape(f.type)}  \(default: [^\n]+\)$", out, re.MULTILINE), f.name
        help_text = f.metadata.get("help")
        assert help_text, f"`{f.name}` has no help text"
        assert _flat(help_text.replace("``", "`")) in flat, f.name


def test_help_defaults_are_shown_as_they_are_written(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_overrides(["-h"])
    out = capsys.readouterr().out
    for line in ("--learning_rate float  (default: 0.0002)", "--gradient_checkpointing bool  (default: true)",
                 "--passkey_eval_lengths list[int]  (default: [1024, 2048])",
                 "--eval_dataset str | list[str] | None  (default: null)",
                 "--config_overrides dict[str, Any]  (default: {})", "--output_dir str  (default: outputs/run)"):
        assert line in out


def test_train_lora_main_help_exits_0_without_running(monkeypatch, capsys) -> None:
    from recipes import train_lora

    monkeypatch.setattr(train_lora, "run", lambda cfg: pytest.fail("run() was called"))
    with pytest.raises(SystemExit) as exit_info:
        train_lora.main(["--config", str(EMBEDDED), "--max_steps", "3", "--help"])
    assert exit_info.value.code in (0, None)
    assert "--lora_r int  (default: 16)" in capsys.readouterr().out


def test_train_lora_main_rejects_a_bad_value_before_running(monkeypatch) -> None:
    from recipes import train_lora

    monkeypatch.setattr(train_lora, "run", lambda cfg: pytest.fail("run() was called"))
    with pytest.raises(ValueError, match=r"`learning_rate` must be a number, but got 'abc' \(str\)"):
        train_lora.main(["--config", str(EMBEDDED), "--learning_rate", "abc"])


# ------------------------------------------------------------------------------------------------- floats


@pytest.mark.parametrize(
    ("raw", "expected"), [("1e-4", 1e-4), ("2e-4", 2e-4), ('"2.0e-4"', 2e-4), ("1E-5", 1e-5), ("3", 3.0)]
)
def test_float_key_from_the_command_line(raw, expected) -> None:
    cfg = _load("--learning_rate", raw)
    assert type(cfg.learning_rate) is float and cfg.learning_rate == pytest.approx(expected)


def test_float_keys_from_a_yaml_file(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1e-4\nweight_decay: 0\ndevice_peak_tflops: 989\nseq_len: 2048\n")
    cfg = load_recipe(recipe)
    assert type(cfg.learning_rate) is float and cfg.learning_rate == pytest.approx(1e-4)
    assert type(cfg.weight_decay) is float and cfg.weight_decay == 0.0
    assert type(cfg.device_peak_tflops) is float and cfg.device_peak_tflops == 989.0


@pytest.mark.parametrize(("key", "raw"), [("learning_rate", "abc"), ("lora_dropout", "true"), ("max_grad_norm", "[1]")])
def test_float_keys_reject_non_numbers(key, raw) -> None:
    with pytest.raises(ValueError, match=rf"`{key}` must be a number, but got .+; e\.g\. --{key} \S+"):
        _load(f"--{key}", raw)


# --------------------------------------------------------------------------------------------------- ints


def test_int_error_message_format() -> None:
    with pytest.raises(ValueError) as error:
        _load("--max_steps", "abc")
    assert str(error.value) == "`max_steps` must be an integer, but got 'abc' (str); e.g. --max_steps 20"


@pytest.mark.parametrize(
    ("key", "raw", "shown"),
    [("max_steps", "abc", "'abc' (str)"), ("lora_r", "8.5", "8.5 (float)"), ("lora_r", "8.0", "8.0 (float)"),
     ("seq_len", "true", "True (bool)"), ("save_total_limit", "2.5", "2.5 (float)"), ("seed", "[1]", "[1] (list)")],
)
def test_int_keys_reject_non_integers(key, raw, shown) -> None:
    # A float is never taken for an int key, not even 8.0.
    with pytest.raises(ValueError, match=rf"`{key}` must be an integer( or null)?, but got {re.escape(shown)}; "
                                         rf"e\.g\. --{key} \d+$"):
        _load(f"--{key}", raw)


def test_int_keys_from_a_yaml_file_are_checked(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora_r: 8.5\n")
    with pytest.raises(ValueError, match=r"`lora_r` must be an integer, but got 8\.5 \(float\); e\.g\. --lora_r 16"):
        load_recipe(recipe)
    recipe.write_text("max_steps: abc\n")
    with pytest.raises(ValueError, match=r"`max_steps` must be an integer, but got 'abc' \(str\)"):
        load_recipe(recipe)


def test_int_keys_accept_integer_text() -> None:
    cfg = load_recipe(EMBEDDED, {"lora_r": "8", "max_steps": " 3 "})
    assert (cfg.lora_r, cfg.max_steps) == (8, 3)


# -------------------------------------------------------------------------------------------------- bools


@pytest.mark.parametrize("raw", ["maybe", "2", "0.5", "[true]"])
def test_bool_keys_reject_other_values(raw) -> None:
    with pytest.raises(ValueError, match=r"`gradient_checkpointing` must be a boolean \(true/false\), but got .+; "
                                         r"e\.g\. --gradient_checkpointing true$"):
        _load("--gradient_checkpointing", raw)


def test_bool_keys_accept_true_false_and_their_spellings() -> None:
    cases = {"true": True, "false": False, "True": True, "FALSE": False, "yes": True, "no": False, "1": True,
             "0": False, '"false"': False, "'true'": True}
    for raw, expected in cases.items():
        assert _load("--gradient_checkpointing", raw).gradient_checkpointing is expected, raw
        assert _load(f"--skip_passkey_eval={raw}").skip_passkey_eval is expected, raw


# ------------------------------------------------------------------------------------------ optional / str


def test_optional_keys_accept_null() -> None:
    cfg = _load("--save_total_limit", "null", "--device_peak_tflops", "none", "--eval_dataset", "None",
                "--resume_from_checkpoint", "null")
    assert (cfg.save_total_limit, cfg.device_peak_tflops, cfg.eval_dataset, cfg.resume_from_checkpoint) == (None,) * 4
    cfg = _load("--save_total_limit", "3", "--device_peak_tflops", "989", "--resume_from_checkpoint", "latest")
    assert type(cfg.device_peak_tflops) is float and cfg.device_peak_tflops == 989.0
    assert (cfg.save_total_limit, cfg.resume_from_checkpoint) == (3, "latest")


def test_non_optional_keys_reject_null() -> None:
    with pytest.raises(ValueError, match=r"`max_steps` must be an integer, but got None \(NoneType\)"):
        _load("--max_steps", "null")


def test_string_keys_keep_the_text_as_typed() -> None:
    cfg = _load("--output_dir", "2024", "--resume_from_checkpoint", "0.10")
    assert (cfg.output_dir, cfg.resume_from_checkpoint) == ("2024", "0.10")
    with pytest.raises(ValueError, match=r"`dataset` must be a string or a list of strings, but got 3 \(int\)"):
        _load("--dataset", "3")


# -------------------------------------------------------------------------------------------------- lists


def test_list_keys_are_typed() -> None:
    cfg = _load("--seq_len", "256", "--passkey_eval_lengths", "[128, 256]", "--passkey_eval_depths", "[0, 0.5, 1e-1]",
                "--dataset", "[a.jsonl, b.jsonl]", "--config_overrides", "{max_position_embeddings: 8192}")
    assert cfg.passkey_eval_lengths == [128, 256] and all(type(n) is int for n in cfg.passkey_eval_lengths)
    assert cfg.passkey_eval_depths == [0.0, 0.5, 0.1] and all(type(d) is float for d in cfg.passkey_eval_depths)
    assert cfg.dataset == ["a.jsonl", "b.jsonl"] and cfg.config_overrides == {"max_position_embeddings": 8192}
    assert _load("--passkey_eval_lengths", "2048").passkey_eval_lengths == [2048]  # one value: a list of one


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [("passkey_eval_lengths", "[1.5]", "a list of integers"), ("passkey_eval_lengths", "[128, abc]",
     "a list of integers"), ("passkey_eval_depths", "[abc]", "a list of numbers"),
     ("lora_target_modules", "[1, 2]", "a string or a list of strings"), ("config_overrides", "[1]", "a mapping")],
)
def test_list_keys_reject_wrong_element_types(key, raw, expected) -> None:
    with pytest.raises(ValueError, match=rf"`{key}` must be {expected}, but got .+; e\.g\. --{key} \S"):
        _load(f"--{key}", raw)


# ------------------------------------------------------------------------------------------ shipped recipes


def test_shipped_recipes_load_with_typed_values() -> None:
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    hints = typing.get_type_hints(RecipeConfig)
    for path in recipes:
        cfg = load_recipe(path)
        for f in FIELDS:
            value = getattr(cfg, f.name)
            assert _conforms(value, hints[f.name]), f"{path.name}: `{f.name}` = {value!r} is not {f.type}"
