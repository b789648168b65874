"""The argparse flavour every ``thoughtform`` sub-tool shares: a mistake is one line, exit 2."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a mistake as one line (``PROG: error: ...``) and exit status 2,
    instead of the usage block first."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``PROG: error: ...`` and exit 2."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)
