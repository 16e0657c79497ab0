"""What every command line shares: help that shows each flag's default.

argparse's ArgumentDefaultsHelpFormatter appends "(default: ...)" to every flag's help; this one
leaves it off where the default means "not given" (None) or is a switch's False, which would
only read as noise.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter, without "(default: None)" and "(default: False)"."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
