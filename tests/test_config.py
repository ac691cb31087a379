"""The strict config loader (config.py): dotted overrides, type checks, unknown keys with hints,
presets, precedence of the layers, and round trips through dicts and files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from prompt_ris.config import (
    MODEL_PRESETS,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Dotted overrides: YAML scalars
# --------------------------------------------------------------------------------------------
def test_defaults_are_the_papers_model() -> None:
    cfg = load_config()
    assert cfg == Config() and cfg.model.preset == "vit_b"
    assert (cfg.model.clip.image_size, cfg.model.sam.image_size) == (480, 1024)
    assert (cfg.train.lr, cfg.train.stage1_epochs, cfg.train.stage2_epochs) == (1e-4, 20, 30)


def test_overrides_parse_yaml_scalars() -> None:
    cfg = load_config(
        overrides=[
            "train.lr=2e-4",  # YAML 1.1 reads "2e-4" as a string: a float field takes it
            "train.weight_decay=1e-2",
            "train.seed=7",
            "model.cmp.num_prompts=8",
            "train.compile=true",
            "eval.splits=[refcoco:val, refcoco:testA]",
            "train.max_steps_per_epoch=null",
            "train.sam_embed_cache=",  # an empty value is None too
            "data.val=refcoco+:val",  # ':' and '+' inside a plain string
            "model.sam.encoder_global_attn_indexes=[1, 3]",
        ]
    )
    assert cfg.train.lr == 2e-4 and type(cfg.train.lr) is float
    assert cfg.train.weight_decay == 0.01 and type(cfg.train.weight_decay) is float
    assert cfg.train.seed == 7 and cfg.model.cmp.num_prompts == 8
    assert cfg.train.compile is True
    assert cfg.eval.splits == ["refcoco:val", "refcoco:testA"]
    assert cfg.train.max_steps_per_epoch is None and cfg.train.sam_embed_cache is None
    assert cfg.data.val == "refcoco+:val"
    assert cfg.model.sam.encoder_global_attn_indexes == [1, 3]
    # A value may itself contain '=': only the first one splits key from value.
    assert load_config(overrides=["train.output_dir=runs/a=b"]).train.output_dir == "runs/a=b"


def test_string_floats_in_files_too(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "train:\n  lr: 1e-4\n  icl_weight: 5e-1\n")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-4"  # what YAML 1.1 gives
    cfg = load_config(path)
    assert cfg.train.lr == 1e-4 and cfg.train.icl_weight == 0.5


def test_override_without_equals_sign_is_refused() -> None:
    with pytest.raises(ConfigError, match="'train.lr' must look like section.key=value"):
        load_config(overrides=["train.lr"])


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.seed=abc", "train.seed: expected int, got 'abc'"),
        ("train.seed=1.5", "train.seed: expected int, got 1.5"),
        ("train.seed=true", "train.seed: expected int, got True"),  # bool is not int
        ("train.lr=abc", "train.lr: expected float, got 'abc'"),
        ("train.lr=true", "train.lr: expected float, got True"),  # nor a float
        ("train.compile=1", "train.compile: 1 does not match"),  # int is not bool
        ("model.prompts.switches=mask + dot", "model.prompts.switches: unknown prompt type 'dot'"),
        ("model.prompts.switches=text + text", "names a prompt type twice"),
        ("eval.splits=refcoco:val", "eval.splits: expected a list, got 'refcoco:val'"),
        ("model.sam.encoder_global_attn_indexes=[1, x]", r"encoder_global_attn_indexes\[1\]"),
        ("train.max_steps_per_epoch=abc", "train.max_steps_per_epoch: 'abc' does not match"),
        ("model.clip=5", "model.clip: expected a mapping, got 5"),
    ],
)
def test_wrong_types_raise_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_int_widens_to_float_and_numbers_to_strings() -> None:
    cfg = load_config(overrides=["train.lr=1", "train.icl_weight=0"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.train.icl_weight) is float
    assert load_config(overrides=["train.output_dir=2024"]).train.output_dir == "2024"
    assert load_config({"train": {"lr": 3}}).train.lr == 3.0


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------------------------
# Unknown keys
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", r"unknown config key 'train.lrr'; did you mean 'train.lr'\?"),
        ("trian.lr=1", r"unknown config key 'trian'; did you mean 'train'\?"),
        (
            "model.clip.imagesize=64",
            r"'model.clip.imagesize'; did you mean 'model.clip.image_size'",
        ),
        ("model.foo.bar=1", r"unknown config key 'model.foo'$"),  # nothing close: no hint
        ("train.use_mask=false", r"unknown config key 'train.use_mask'$"),
        ("model.prompts.use_text=false", r"unknown config key 'model.prompts.use_text'"),
        ("eval.use_text=false", r"unknown config key 'eval.use_text'"),
    ],
)
def test_unknown_keys_raise_with_the_nearest_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_unknown_keys_in_nested_file_sections(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model:\n  sam:\n    checkpont: x.pth\n")
    with pytest.raises(
        ConfigError, match="'model.sam.checkpont'; did you mean 'model.sam.checkpoint'"
    ):
        load_config(path)
    # An unknown section is named at its own level, not at the keys inside it.
    with pytest.raises(ConfigError, match="unknown config key 'model.decoder.extra'$"):
        load_config({"model": {"decoder": {"extra": {"depth": 2}}}})
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        load_config({"optimizer": {"name": "adamw"}})


# --------------------------------------------------------------------------------------------
# Presets and precedence
# --------------------------------------------------------------------------------------------
def test_preset_fills_the_model_then_file_keys_apply(tmp_path: Path) -> None:
    # The file names the preset after one of its own model keys: the preset still goes first.
    path = _yaml(tmp_path, "model:\n  clip:\n    image_size: 64\n  preset: tiny\n")
    cfg = load_config(path)
    assert cfg.model.preset == "tiny"
    assert cfg.model.clip.image_size == 64  # the file's key wins over the preset's 128
    assert cfg.model.clip.vision_width == 64  # the rest is the preset's
    assert cfg.model.sam.image_size == MODEL_PRESETS["tiny"]["sam"]["image_size"] == 256
    assert cfg.model.sam.checkpoint == MODEL_PRESETS["tiny"]["sam"]["checkpoint"]


def test_precedence_defaults_preset_file_overrides(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "model:\n  clip:\n    image_size: 96\n    text_length: 12\ntrain:\n  lr: 3.0e-4\n"
        "  seed: 5\n",
    )
    # The preset comes from the overrides, yet the file's model keys still beat it.
    cfg = load_config(path, ["model.preset=tiny", "train.lr=5e-4", "model.clip.text_length=10"])
    assert cfg.model.preset == "tiny"
    assert cfg.model.clip.vision_width == 64  # preset over default (768)
    assert cfg.model.clip.image_size == 96  # file over preset (128) and default (480)
    assert cfg.model.clip.text_length == 10  # override over file (12), preset and default
    assert cfg.train.lr == 5e-4 and cfg.train.seed == 5  # override over file; file over default
    assert cfg.train.weight_decay == 0.01  # untouched default
    # A later layer's preset wins; the earlier layer's explicit keys are kept.
    back = load_config(
        {"model": {"preset": "tiny", "cmp": {"num_prompts": 2}}}, ["model.preset=vit_b"]
    )
    assert back.model.preset == "vit_b" and back.model.clip.vision_width == 768
    assert back.model.cmp.num_prompts == 2
    with pytest.raises(ConfigError, match="model.preset 'big' is unknown; choose one of"):
        load_config(overrides=["model.preset=big"])


def test_repository_configs_load() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config), path
    tiny = load_config(ROOT / "configs" / "tiny_synthetic.yaml")
    assert tiny.model.preset == "tiny" and tiny.train.icl_weight == 1.0
    assert tiny.train.lr == 0.001 and tiny.eval.splits[0] == "synthetic:val"


def test_the_grounded_demo_config_is_the_demo_plus_its_named_changes() -> None:
    """configs/tiny_synthetic_grounded.yaml must not drift from the demo's config: it differs
    only in the grounded prompter's keys (and its output folder)."""

    def flat(cfg: Config) -> dict[str, object]:
        return {
            f"{section}.{key}": value
            for section, values in config_to_dict(cfg).items()
            for key, value in (values.items() if isinstance(values, dict) else [("", values)])
        }

    demo = flat(load_config(ROOT / "configs" / "tiny_synthetic.yaml"))
    grounded = flat(load_config(ROOT / "configs" / "tiny_synthetic_grounded.yaml"))
    changed = {key for key in demo if demo[key] != grounded[key]}
    assert changed == {"model.prompts", "train.output_dir", "train.stage2_epochs",
                       "train.text_prompter_lr", "train.text_grounding_weight"}  # fmt: skip
    prompts = load_config(ROOT / "configs" / "tiny_synthetic_grounded.yaml").model.prompts
    assert (prompts.text_keys, prompts.text_position, prompts.text_start) == (
        "mlp", "keys+values", "random")  # fmt: skip
    assert (prompts.drop_mask, prompts.drop_point, prompts.drop_text) == (0.5, 0.5, 0.2)


def test_the_ambiguous_demo_config_is_the_demo_with_the_ambiguous_sam() -> None:
    """configs/tiny_synthetic_ambiguous.yaml is the paper's recipe of the demo with only the
    miniature SAM pretrained for ambiguous clicks (and its output folder)."""
    demo = config_to_dict(load_config(ROOT / "configs" / "tiny_synthetic.yaml"))
    ambiguous = config_to_dict(load_config(ROOT / "configs" / "tiny_synthetic_ambiguous.yaml"))
    sam_path = "checkpoints/tiny_synthetic_ambiguous/sam_tiny_synthetic_ambiguous.pth"
    assert ambiguous["model"]["sam"].pop("checkpoint") == sam_path
    assert (
        demo["model"]["sam"].pop("checkpoint")
        == "checkpoints/tiny_synthetic/sam_tiny_synthetic.pth"
    )
    assert ambiguous["train"].pop("output_dir") != demo["train"].pop("output_dir")
    assert ambiguous == demo
    assert (ROOT / sam_path).is_file()


def test_tiny_preset_differs_from_the_paper_model_only_in_sizes() -> None:
    """Same freezing and prompting as ``vit_b``; pretrained base weights (the committed
    miniature foundations) instead of random ones."""
    paper, tiny = load_config(None).model, load_config({"model": {"preset": "tiny"}}).model
    for section in ("clip", "sam", "prompts"):
        for field in dataclasses.fields(getattr(paper, section)):
            name = field.name
            if name in {"freeze", "fast_attention"} or name.startswith(
                ("freeze_", "use_", "drop_", "gumbel")
            ):
                assert getattr(getattr(tiny, section), name) == getattr(
                    getattr(paper, section), name
                ), f"model.{section}.{name}"
    assert tiny.clip.pretrained == "checkpoints/tiny_synthetic/clip_tiny_synthetic.pt"
    assert tiny.sam.checkpoint == "checkpoints/tiny_synthetic/sam_tiny_synthetic.pth"
    for path in (tiny.clip.pretrained, tiny.sam.checkpoint):
        assert (ROOT / path).is_file(), path


# --------------------------------------------------------------------------------------------
# Round trips and files
# --------------------------------------------------------------------------------------------
def _changed() -> Config:
    return load_config(
        {"model": {"preset": "tiny", "cmp": {"num_prompts": 3}}},
        ["train.lr=2e-4", "eval.splits=[a:val, b:testA]", "data.max_val_expressions=50"],
    )


def test_dict_round_trip() -> None:
    cfg = _changed()
    data = config_to_dict(cfg)
    assert data["train"]["lr"] == 2e-4 and data["model"]["cmp"]["num_prompts"] == 3
    assert json.loads(json.dumps(data)) == data  # JSON-ready
    assert config_from_dict(data) == cfg
    assert config_from_dict(json.loads(json.dumps(data))) == cfg
    # Read back from a file a program wrote: unknown keys outside the model section warn.
    with pytest.warns(UserWarning, match="unknown config key 'train.lrr'.*ignored"):
        assert config_from_dict({"train": {"lrr": 1.0}}) == Config()


@pytest.mark.parametrize("name", ["config.yaml", "config.yml", "config.json"])
def test_save_config_round_trip(tmp_path: Path, name: str) -> None:
    cfg = _changed()
    path = tmp_path / "nested" / name
    save_config(cfg, path)  # creates the folder
    text = path.read_text()
    data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    assert data == config_to_dict(cfg)
    assert load_config(path) == cfg  # a saved config is a valid config file
    if name.endswith(".yaml"):
        assert text.startswith("model:\n  preset: tiny\n")  # fields in schema order


def test_missing_file_raises_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config file '.*nowhere\.yaml' not found"):
        load_config(tmp_path / "nowhere.yaml")


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_config(_yaml(tmp_path, "# nothing but a comment\n")) == Config()


@pytest.mark.parametrize("source", ["file", "override"])
def test_non_mapping_model_section_raises_config_error(tmp_path: Path, source: str) -> None:
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        if source == "file":
            load_config(_yaml(tmp_path, "model:\ntrain:\n  lr: 1.0e-4\n"))  # empty section
        else:
            load_config(overrides=["model=5"])
