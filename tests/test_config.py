from __future__ import annotations

import pytest

from lmshrink.cli import main
from lmshrink.config import SettingsError, build, from_args
from lmshrink.recipes.truncate import TruncateSettings


def test_yaml_and_flags_use_the_same_names(tmp_path):
    config = tmp_path / "t.yaml"
    config.write_text("output: out\nnum_layers: 4\nkeep: null\nstrategy: distil\n")
    settings = from_args(TruncateSettings, ["--config", str(config), "--strategy", "bottom"], "t", "")
    assert settings.num_layers == 4 and settings.strategy == "bottom" and settings.output == "out"
    config.write_text("output: out\nkeep: [0, 2, 5]\n")
    assert from_args(TruncateSettings, ["--config", str(config)], "t", "").keep == [0, 2, 5]
    assert from_args(TruncateSettings, ["--output", "o", "--keep", "1,3"], "t", "").keep == [1, 3]


def test_unknown_keys_are_an_error(tmp_path):
    config = tmp_path / "t.yaml"
    config.write_text("output: out\nnum_layer: 4\n")
    with pytest.raises(SettingsError, match="unknown setting.*num_layer.*known settings are"):
        from_args(TruncateSettings, ["--config", str(config)], "t", "")


def test_types_and_required_fields():
    with pytest.raises(SettingsError, match="num_layers: 'six' is not a valid int"):
        build(TruncateSettings, {"output": "o", "num_layers": "six"})
    with pytest.raises(SettingsError, match="missing required setting.*--output"):
        build(TruncateSettings, {})


def test_all_problems_are_reported_at_once():
    with pytest.raises(SettingsError) as err:
        build(TruncateSettings, {"output": "o", "strategy": "nope", "num_layers": 2, "ratio": 0.5, "metric": "x"})
    message = str(err.value)
    assert "strategy" in message and "give one of them" in message and "metric" in message


def test_every_bad_type_in_a_config_is_reported_at_once(tmp_path):
    config = tmp_path / "t.yaml"
    config.write_text("num_layers: six\nratio: half\noverwrite: maybe\nnum_layer: 4\n")
    with pytest.raises(SettingsError) as err:
        from_args(TruncateSettings, ["--config", str(config)], "t", "")
    message = str(err.value)
    for part in ("num_layers: 'six'", "ratio: 'half'", "overwrite: 'maybe'", "'num_layer'", "--output"):
        assert part in message


def test_cli_errors_are_messages_not_tracebacks(capsys):
    assert main(["truncate", "--output", "o", "--num-layers", "0"]) == 2
    assert "num_layers: must be at least 1" in capsys.readouterr().err
    assert main(["shrink"]) == 2
    assert "unknown command 'shrink'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "truncate" in capsys.readouterr().out


def test_help_loads_no_heavy_library():
    """`lmshrink --help` imports no command module, so it answers at once."""
    import subprocess
    import sys

    code = ("import sys; from lmshrink.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'transformers', 'datatrove', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


def test_shipped_configs_are_valid(tmp_path, monkeypatch):
    """Each YAML in configs/ names its command in the header and builds that command's settings."""
    import re
    from pathlib import Path

    from lmshrink.cli import command
    from lmshrink.config import load_yaml

    root = Path(__file__).parent.parent
    files = sorted(root.joinpath("configs").glob("*.yaml"))
    monkeypatch.chdir(tmp_path)  # as in a fresh clone: no runs/ from earlier work, configs/ beside
    (tmp_path / "configs").symlink_to(root / "configs")
    assert len(files) >= 7
    for file in files:
        commands = re.findall(rf"lmshrink (\S+) --config configs/{re.escape(file.name)}", file.read_text())
        assert commands, f"{file.name}: the header must say the command that runs it"
        settings = build(command(commands[0])[0], load_yaml(file))
        assert settings.output.startswith("runs/")
        if getattr(settings, "deepspeed", None):
            assert (root / settings.deepspeed).is_file()


def test_groups_take_flat_dotted_and_nested_names(tmp_path):
    """A group's setting is set by its own name, its dotted path or a nested YAML mapping; a
    command's default for a group (distill's DistilGPT-2 optimiser) survives a partial override."""
    from lmshrink.recipes.distill import DistillSettings

    base = {"model": "m", "output": "o", "data": ["x"]}
    assert build(DistillSettings, {**base, "lr": 1e-3}).train.lr == 1e-3
    assert build(DistillSettings, {**base, "train.lr": 1e-3}).train.lr == 1e-3
    nested = build(DistillSettings, {**base, "train": {"batch_size": 2}, "kd": {"temperature": 1}})
    assert nested.train.batch_size == 2 and nested.kd.temperature == 1.0
    assert nested.train.lr == 2.5e-4 and nested.train.max_grad_norm == 5.0  # the group's command default kept
    config = tmp_path / "d.yaml"
    config.write_text("model: m\noutput: o\ncorpus:\n  data: [x]\n  block_size: 64\ntrain:\n  lr: 0.01\n")
    settings = from_args(DistillSettings, ["--config", str(config), "--train.lr", "0.02", "--alpha-ce", "1"], "d", "")
    assert settings.corpus.block_size == 64 and settings.train.lr == 0.02 and settings.kd.alpha_ce == 1.0


def test_a_name_two_groups_share_needs_its_group():
    from lmshrink.recipes.demo import DemoSettings

    with pytest.raises(SettingsError, match="max_tokens: this command has several; say which: train.max_tokens, "
                                            "perplexity.max_tokens"):
        build(DemoSettings, {"max_tokens": 10, "tasks": []})
    settings = build(DemoSettings, {"train.max_tokens": 10, "perplexity": {"max_tokens": 20}, "tasks": []})
    assert settings.train.max_tokens == 10 and settings.perplexity.max_tokens == 20
    with pytest.raises(SettingsError, match="--max-tokens: this command has several; say which: --train.max-tokens"):
        from_args(DemoSettings, ["--max-tokens", "5"], "demo", "")


def test_a_record_builds_the_same_settings_again():
    """The resolved settings in lmshrink.json are a valid config: a run is re-made from its folder."""
    from lmshrink.config import to_dict
    from lmshrink.recipes.distill import DistillSettings

    settings = build(DistillSettings, {"model": "m", "output": "o", "data": ["x"], "lr": 1e-3, "loss": "tv"})
    assert build(DistillSettings, to_dict(settings)) == settings


def test_group_problems_are_gathered_with_the_commands():
    from lmshrink.recipes.distill import DistillSettings

    with pytest.raises(SettingsError) as err:
        build(DistillSettings, {"model": "m", "output": "o", "batch_size": 0, "loss": "kl", "block_size": 0})
    for part in ("data: give at least one", "batch_size: must be positive", "loss: 'kl' is unknown", "block_size"):
        assert part in str(err.value)


def test_setting_names_are_unique_or_grouped():
    """Every command's settings: each accepted name leads to one setting, and --help lists groups."""
    from lmshrink.cli import COMMANDS, command
    from lmshrink.config import leaves, names, parser_for

    for name in COMMANDS:
        cls, _ = command(name)
        paths = [leaf.path for leaf in leaves(cls)]
        assert len(paths) == len(set(paths))
        assert set(names(cls).values()) == set(paths)
        parser_for(cls, name, "").format_help()  # every flag registers without a clash


def test_settings_marked_how_to_run_are_one_run_and_the_rest_decide_it():
    """One marking on the field (`setting(..., how_to_run=True)`) is all that says a setting does not
    change a run's result: carrying on, reusing a stage and comparing records all read it."""
    from lmshrink.config import how_to_run_paths, to_dict
    from lmshrink.heal.runs import changed_settings, same_settings
    from lmshrink.recipes.clean import CleanSettings
    from lmshrink.recipes.pretrain import PretrainSettings

    run = build(PretrainSettings, {"model": "m", "data": "d", "output": "o"})
    assert {"output", "train.logging_steps", "train.resume", "train.fused_head"} <= how_to_run_paths(PretrainSettings)
    assert "train.lr" not in how_to_run_paths(PretrainSettings)
    recorded = to_dict(run)
    moved = build(PretrainSettings, {"model": "m", "data": "d", "output": "elsewhere", "logging_steps": 1})
    assert same_settings(recorded, moved) and changed_settings(recorded, moved) == []
    faster = build(PretrainSettings, {"model": "m", "data": "d", "output": "o", "lr": 1e-3})
    assert not same_settings(recorded, faster) and changed_settings(recorded, faster)[0].startswith("train.lr ")
    assert {"workers", "executor_options", "restart", "report_only"} <= how_to_run_paths(CleanSettings)


def test_a_record_made_before_a_setting_moved_into_a_group_is_the_same_run():
    """`dtype` and `trust_remote_code` moved into the `load` group: a run recorded with them at the top
    is carried on or reused by the same settings, and a changed dtype is still named."""
    from lmshrink.config import to_dict
    from lmshrink.heal.runs import changed_settings, same_settings
    from lmshrink.recipes.pretrain import PretrainSettings

    run = build(PretrainSettings, {"model": "m", "data": "d", "output": "o", "dtype": "bfloat16"})
    old = to_dict(run)
    old.update(old.pop("load"))  # as lmshrink.json held it before the group
    assert old["dtype"] == "bfloat16" and "load" not in old
    assert same_settings(old, run) and changed_settings(old, run) == []
    other = build(PretrainSettings, {"model": "m", "data": "d", "output": "o"})
    assert not same_settings(old, other)
    assert changed_settings(old, other) == ["load.dtype 'bfloat16' -> 'float32'"]


def test_the_load_group_checks_its_dtype_before_any_model_loads():
    from lmshrink.recipes.truncate import TruncateSettings

    with pytest.raises(SettingsError, match="dtype: 'int3' is unknown; choose one of auto, float32"):
        build(TruncateSettings, {"teacher": "m", "output": "o", "dtype": "int3"})
