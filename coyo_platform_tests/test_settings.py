"""One source per setting: each stage's settings dataclass is the only place a setting is written;
the asset's launchpad config, the program's flags and the CLI's flags are derived from it, and
these tests fail when any of them differs from it (names, defaults, help, types)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pydantic
import pytest

from coyo_platform.assets import StageConfig
from coyo_platform.assets.coyo700m_metadata import MetadataConfig
from coyo_platform.assets.downloaded_shards import DownloadConfig
from coyo_platform.assets.label_stats import StatsConfig
from coyo_platform.assets.labeled_shards import LabelConfig
from coyo_platform.assets.subset_plan import PlanConfig
from coyo_platform.common.settings import HELP, fields_of, from_arguments, setting, to_arguments
from coyo_platform.download.__main__ import parse_args as download_args
from coyo_platform.download.__main__ import parser as download_parser
from coyo_platform.download.settings import DownloadSettings
from coyo_platform.ingest.metadata import IngestSettings
from coyo_platform.label.__main__ import parse_args as label_args
from coyo_platform.label.__main__ import parser as label_parser
from coyo_platform.label.settings import LabelSettings
from coyo_platform.sample.rules import Sampling
from coyo_platform.stats.aggregate import StatsSettings

STAGES = {
    "ingest": (IngestSettings, MetadataConfig),
    "download": (DownloadSettings, DownloadConfig),
    "label": (LabelSettings, LabelConfig),
    "stats": (StatsSettings, StatsConfig),
    "sample": (Sampling, PlanConfig),
}
PROGRAMS = {
    "download": (DownloadSettings, download_parser, ["--metadata", "m", "--output", "o"]),
    "label": (LabelSettings, label_parser, ["--shards", "s", "--output", "o"]),
}


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def config_differences(settings_class: type, config_class: type[pydantic.BaseModel]) -> list[str]:
    """How a launchpad config differs from the settings it should be: fields, defaults, help."""
    found = []
    fields = fields_of(settings_class)
    names = [f.name for f, _ in fields]
    if list(config_class.model_fields) != names:
        found.append(f"fields {list(config_class.model_fields)} != {names}")
    for field, _ in fields:
        model_field = config_class.model_fields.get(field.name)
        if model_field is None:
            continue
        default = _plain(model_field.get_default(call_default_factory=True))
        if default != field.default:
            found.append(f"{field.name}: default {default!r} != {field.default!r}")
        if model_field.description != field.metadata[HELP]:
            found.append(f"{field.name}: help {model_field.description!r}")
    return found


def flag_differences(settings_class: type, parser: argparse.ArgumentParser, given: set) -> list:
    """How a program's flags differ from its settings: every setting a flag, same default."""
    actions = {a.dest: a for a in parser._actions if a.dest not in given | {"help"}}
    fields = {f.name: f for f, _ in fields_of(settings_class)}
    found = [f"flag without a setting: {d}" for d in actions if d not in fields]
    found += [f"setting without a flag: {n}" for n in fields if n not in actions]
    for name in fields.keys() & actions.keys():
        if actions[name].default != fields[name].default:
            found.append(f"{name}: default {actions[name].default!r} != {fields[name].default!r}")
        if not actions[name].help.startswith(fields[name].metadata[HELP]):
            found.append(f"{name}: help {actions[name].help!r}")
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_launchpad_config_is_the_stage_settings(stage: str):
    settings_class, config_class = STAGES[stage]
    assert issubclass(config_class, StageConfig)
    assert config_differences(settings_class, config_class) == []
    # the launchpad shows the settings' own description, not a generated signature
    assert config_class.__doc__ == settings_class.__doc__
    assert not settings_class.__doc__.startswith(settings_class.__name__ + "(")
    assert config_class().to_settings() == settings_class()  # the defaults make the defaults


@pytest.mark.parametrize("program", PROGRAMS)
def test_program_flags_are_the_stage_settings(program: str):
    settings_class, make_parser, required = PROGRAMS[program]
    parser = make_parser()
    given = {"shards", "metadata", "output", "part"}  # the inputs, not settings
    assert flag_differences(settings_class, parser, given) == []
    assert from_arguments(settings_class, parser.parse_args(required)) == settings_class()


def test_the_checks_catch_a_config_or_flag_that_drifted():
    """The comparisons above can fail: a hand-written config and parser that drifted from their
    settings (another default, a missing field, other help) are reported."""

    @dataclass(frozen=True)
    class Settings:
        size: int = setting(512, "the size")
        name: str | None = setting(None, "a name")

    class Drifted(pydantic.BaseModel):
        size: int = pydantic.Field(384, description="the size")

    assert config_differences(Settings, Drifted) == [
        "fields ['size'] != ['size', 'name']",
        "size: default 384 != 512",
    ]
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", dest="size", type=int, default=512, help="another text")
    assert flag_differences(Settings, parser, set()) == [
        "setting without a flag: name",
        "size: help 'another text'",
    ]


def test_asset_config_reaches_the_program_as_flags_it_accepts():
    """Every setting the UI offers reaches the program as a flag it accepts, booleans and lists
    included, and the program makes the same settings from them as the asset does."""
    config = LabelConfig(
        model="test_efficientnet",
        precision="fp32",
        batch_size=8,
        compile=True,
        decode_on_device=False,
    )
    args = label_args(["--shards", "s", "--output", "o", *to_arguments(config.model_dump())])
    assert (args.model, args.precision, args.batch_size) == ("test_efficientnet", "fp32", 8)
    assert (args.compile, args.decode_on_device, args.channels_last) == (True, False, True)
    assert set(LabelConfig.model_fields) <= set(vars(args))
    assert from_arguments(LabelSettings, args) == config.to_settings()

    download = DownloadConfig(
        image_size=384, processes_count=3, allow_networks=["10.0.0.0/8", "127.0.0.1/32"]
    )
    args = download_args(["--metadata", "m", "--output", "o", *to_arguments(download.model_dump())])
    assert (args.image_size, args.processes_count, args.resize_only_if_bigger) == (384, 3, True)
    assert args.allow_networks == ("10.0.0.0/8", "127.0.0.1/32")
    assert set(DownloadConfig.model_fields) <= set(vars(args))
    assert from_arguments(DownloadSettings, args) == download.to_settings()


def test_cli_flags_are_stage_settings():
    """``coyo-platform run``'s settings flags carry their stage's help and reach that stage."""
    from coyo_platform.cli import FLAGS, _parser, configs_from

    parser = _parser()
    [run] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    actions = {a.dest: a for a in run.choices["run"]._actions}
    for _, settings_class, names in FLAGS:
        fields = {f.name: f for f, _ in fields_of(settings_class)}
        for name in names:
            assert actions[name].help.startswith(fields[name].metadata[HELP]), name
            assert actions[name].default is None  # unset: the stage's own default applies
    args = parser.parse_args(["run", "--parts", "p", "--image-size", "384", "--dedup"])
    configs = configs_from(args)
    assert configs["downloaded_shards"] == {"image_size": 384}
    assert configs["subset_plan"] == {"dedup": True}
    assert configs["labeled_shards"] == {} and configs["coyo700m_metadata"] == {}
