"""The one error type of the project library.

A ``ProjectError`` always describes something the user can act on (a file that moved, a class that
does not exist, a project open elsewhere); the CLI prints it as one line and the widgets show it
as a message, so every message names the slide or file concerned and, where there is one, the fix.
"""

from __future__ import annotations

from ..errors import ProjectError


def problems_error(what: str, problems: list[str], limit: int = 30) -> ProjectError:
    """One error listing every problem found, so a user fixes a file once rather than once per run."""
    if len(problems) == 1:  # one problem: one line, as every other error
        return ProjectError(f"{what}: {problems[0]}")
    shown = problems[:limit]
    more = f"\n  … and {len(problems) - limit} more" if len(problems) > limit else ""
    return ProjectError(f"{what} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  "
                        + "\n  ".join(shown) + more)
