"""Every option of every subcommand explains itself; no "(default: None)" on required flags, no doubled
defaults; the long-running commands all take --no-progress."""

import argparse
import re

import pytest

from rectiflow.cli.main import build_parser


def _parsers(parser, name="rectiflow"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


PARSERS = dict(_parsers(build_parser()))


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help(name):
    parser = PARSERS[name]
    missing = [a.option_strings or a.dest for a in parser._actions
               if a.help is None and not isinstance(a, argparse._SubParsersAction)]
    assert not missing, f"{name}: options without help: {missing}"
    assert "(default: None)" not in parser.format_help()
    formatter = parser._get_formatter()
    for a in parser._actions:
        if a.help:  # what the formatter prints for it (ArgumentDefaultsHelpFormatter appends a default)
            shown = formatter._get_help_string(a)
            assert len(re.findall(r"\(default[: ]", shown)) <= 1, f"{name} {a.option_strings}: {shown!r}"


@pytest.mark.parametrize("name", ["rectiflow cache", "rectiflow train-ae", "rectiflow data shapes",
                                  "rectiflow generate"])
def test_long_commands_take_no_progress(name):
    assert "--no-progress" in PARSERS[name].format_help()


def test_train_ae_and_cache_say_they_take_a_manifest():
    assert "manifest" in PARSERS["rectiflow train-ae"].format_help()
    assert "manifest" in PARSERS["rectiflow cache"].format_help()
