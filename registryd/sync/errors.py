"""How a sync run, or one image of it, fails."""
from __future__ import annotations


class JobFailed(Exception):
    """The whole run could not go on (the message says why, in one line)."""


class RunStopped(Exception):
    """The server is stopping: the images under way were finished, the rest resume at the next start."""


class ImageFailed(Exception):
    """One image could not be copied; the run goes on with the others."""
