"""PromptSwitches (prompt_switches.py): names, parsing, Table 5's rows, the one config field and
the flags generated from the prompt types."""

from __future__ import annotations

import pytest

from prompt_ris.cli import build_parser
from prompt_ris.config import ConfigError, load_config
from prompt_ris.prompt_switches import (
    PROMPT_TYPES,
    PromptSwitches,
    SwitchesError,
    parse_switch_sets,
)
from repo_scripts import load_script


def test_names_read_in_prompt_type_order() -> None:
    assert PromptSwitches().name == "mask + point + text"
    assert PromptSwitches(frozenset({"text", "mask"})).name == "mask + text"
    assert PromptSwitches.parse("text + mask") == PromptSwitches.parse("mask + text")
    assert PromptSwitches.parse(" point ").name == "point"
    none = PromptSwitches.parse("none")
    assert none.name == "none" and "mask" not in none and not none.types()
    assert list(PromptSwitches.parse("text + point")) == ["point", "text"]
    assert repr(PromptSwitches.parse("mask")) == "PromptSwitches('mask')"


def test_without_and_the_table_5_rows() -> None:
    full = PromptSwitches()
    assert full.without("text") == PromptSwitches.parse("mask + point")
    assert full.without("mask", "point").name == "text"
    assert [s.name for s in full.ablation()] == [
        "mask + point + text", "point + text", "mask + text", "mask + point",
    ]  # fmt: skip
    assert [s.name for s in PromptSwitches.parse("mask + point").ablation()] == [
        "mask + point", "point", "mask",
    ]  # fmt: skip
    assert [s.name for s in parse_switch_sets(["mask", PromptSwitches.parse("mask"), "text"])] == [
        "mask", "text",
    ]  # fmt: skip
    assert [s.name for s in PromptSwitches.every()] == [  # Table 5's order
        "none", "mask", "point", "text", "mask + point", "mask + text", "point + text",
        "mask + point + text",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mask + dot", "unknown prompt type 'dot'; choose from mask, point, text"),
        ("mask + mask", "names a prompt type twice"),
        ("", "unknown prompt type ''"),
    ],
)
def test_bad_names_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(SwitchesError, match=message):
        PromptSwitches.parse(text)
    with pytest.raises(SwitchesError, match="unknown prompt type 'dot'"):
        PromptSwitches().without("dot")


def test_one_config_field_holds_the_switches() -> None:
    cfg = load_config(overrides=["model.prompts.switches=point + mask"])
    assert PromptSwitches.parse(cfg.model.prompts.switches).name == "mask + point"
    with pytest.raises(ConfigError, match="model.prompts.switches: unknown prompt type 'txt'"):
        load_config(overrides=["model.prompts.switches=mask + txt"])
    for old in ("model.prompts.use_text=false", "eval.use_mask=false"):
        with pytest.raises(ConfigError, match="unknown config key"):
            load_config(overrides=[old])


def test_the_flags_come_from_the_prompt_types() -> None:
    predict = build_parser().parse_args(
        ["predict", "--checkpoint", "c", "--image", "i", "--no-text", "--switches", "mask + text"]
    )
    assert predict.switches == PromptSwitches.parse("mask + text") and predict.no_text
    evaluate_cli = load_script("evaluation/evaluate.py")
    args = evaluate_cli.parse_args(["--checkpoint", "c", "--no-point", "--prompt-ablation"])
    for prompt in PROMPT_TYPES:
        assert hasattr(predict, f"no_{prompt}") and hasattr(args, f"no_{prompt}")
    sets = evaluate_cli.switch_sets(args, PromptSwitches())
    assert [s.name for s in sets] == ["mask + text", "text", "mask"]
    args = evaluate_cli.parse_args(["--checkpoint", "c", "--switches", "point"])
    assert evaluate_cli.switch_sets(args, PromptSwitches()) == [PromptSwitches.parse("point")]
    args = evaluate_cli.parse_args(["--checkpoint", "c", "--every-switch-set"])
    assert [s.name for s in evaluate_cli.switch_sets(args, PromptSwitches())] == [
        "mask + point + text", "none", "mask", "point", "text", "mask + point", "mask + text",
        "point + text",
    ]  # fmt: skip
