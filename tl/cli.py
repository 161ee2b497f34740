"""Command-line front door shared by the entry points.

Hydra reports an unknown group option (`scenario=typo`) in a multi-line block with its search path; tl checks group
choices first so the user gets one line naming the culprit and the options, and exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tl.config import CONF_DIR


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def check_group_choices(argv: list[str]) -> None:
    """Exit with one line if an override picks a config group option that does not exist."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("~", "hydra", "-")):
            continue
        key, value = arg.lstrip("+").split("=", 1)
        group = key.split("@", 1)[0]
        if "." in group or not (CONF_DIR / group).is_dir() or value in ("null", "") or "(" in value or "$" in value:
            continue  # not a group, or a sweep function / interpolation that Hydra expands itself
        for choice in value.split(","):  # a multirun sweep lists several choices
            if choice not in group_options(group):
                print(f"tl: error: {group}={choice} is not a known {group}: choose one of "
                      f"{', '.join(group_options(group))}", file=sys.stderr)
                sys.exit(2)


def check_run_dir(argv: list[str]) -> None:
    """Exit with one line if `hydra.run.dir=DIR` cannot be created (Hydra would fail with a traceback)."""
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            target = Path(arg.split("=", 1)[1]).expanduser()
            parent = target
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                print(f"tl: error: hydra.run.dir={target} cannot be created ({parent} is not a writable folder): "
                      "choose a writable place", file=sys.stderr)
                sys.exit(2)


def launch(hydra_main) -> None:
    """Run a `@hydra.main` entry point after the one-line checks on its command line."""
    check_group_choices(sys.argv[1:])
    check_run_dir(sys.argv[1:])
    hydra_main()
