"""Every command line: help text on every flag, defaults shown (argparse's ArgumentDefaultsHelpFormatter)."""

import argparse
import importlib

import pytest

CLIS = [
    "longnet_ref.lm.train",
    "longnet_ref.lm.experiment",
    "longnet_ref.lm.generate",
    "longnet_ref.bench.__main__",
    "longnet_ref.analysis.figures",
    "longnet_ref.analysis.complexity",
    "longnet_ref.parallel.__main__",
]


class Captured(Exception):
    pass


def parser_of(module_name, monkeypatch):
    """The ArgumentParser that the module's CLI builds (caught at parse_args, before any work)."""
    module = importlib.import_module(module_name)
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    entry = module.main
    with pytest.raises(Captured):
        entry([])
    return seen["parser"]


@pytest.mark.parametrize("module_name", CLIS)
def test_every_flag_has_help_and_the_defaults_are_shown(module_name, monkeypatch):
    parser = parser_of(module_name, monkeypatch)
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), module_name
    missing = [
        action.option_strings or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS and not action.help
    ]
    assert not missing, f"{module_name}: no help text for {missing}"
