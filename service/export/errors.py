"""Export failures, each one sentence naming the file, array, shape or option at fault.

`quorum export` prints them as one line, `quorum export: error: ...`, and exits with
`exit_code`: 2 when the command line itself is wrong (an option, a path that does not exist,
a file of a kind export does not read), as argparse does; 1 when the inputs were read but no
version could be made from them (arrays that do not fit the model, a model that fails to load
or run, a write that fails).
"""

from __future__ import annotations


class ExportError(Exception):
    """The inputs were read, but no version can be made from them (exit status 1)."""

    exit_code = 1


class UsageError(ExportError):
    """The command line is wrong: an option, a missing path, an unreadable kind of file (exit 2)."""

    exit_code = 2
