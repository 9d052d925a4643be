"""The dispatcher: a missing or broken subcommand module fails every command loudly (never a silent skip)."""

import sys

import pytest

from rectiflow.cli import main as cli_main


def test_missing_subcommand_module_fails_loudly(monkeypatch):
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", [*cli_main.SUBCOMMANDS, "no_such_subcommand"])
    with pytest.raises(ModuleNotFoundError, match="rectiflow.cli.no_such_subcommand"):
        cli_main.build_parser()


def test_subcommand_module_that_fails_to_import_fails_loudly(monkeypatch):
    # None in sys.modules makes `import rectiflow.cli.train` raise ImportError, as a broken module would
    monkeypatch.setitem(sys.modules, "rectiflow.cli.train", None)
    with pytest.raises(ImportError, match="rectiflow.cli.train"):
        cli_main.main(["generate", "--help"])


def test_every_listed_subcommand_registers():
    parser = cli_main.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == [n.replace("_", "-") for n in cli_main.SUBCOMMANDS]
