"""The UI's Jinja2 templates, loaded the first time a page is asked for, in a thread.

Jinja2 and five compiled templates cost every worker about 2 MiB of RSS, idle
or not (a worker's idle RSS is a target of issue 15), and most registries'
workers never render a page. So nothing is imported or compiled until the
first page view; that view compiles them in the IO pool (about 0.2 s of
work that never runs on the reactor), and every later one finds them ready.
An error page asked for before any page was rendered compiles only its own
small template, at once.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from registryd.deferreds import Shared

HERE = os.path.dirname(os.path.abspath(__file__))
PAGES = ("repositories.html", "repository.html", "image.html", "mirror.html", "error.html")


class PageTemplates:
    """The environment, built on demand: ``ready`` compiles every page in ``run`` (a pool's run)."""

    def __init__(self, filters: dict[str, Callable[..., Any]], globals: dict[str, Any],
                 run: Callable[[Callable[[], Any]], Any]) -> None:
        self._filters = filters
        self._globals = globals
        self._run = run
        self._environment: Any = None
        self._compiling: Shared[None] | None = None
        self.loaded = False     # every page compiled (an error page may have built a partial one before)

    async def ready(self) -> None:
        """Once every page template is compiled (the first call compiles them, in the pool;
        after a failed compile the next call tries again)."""
        if self.loaded:
            return
        if self._compiling is None or self._compiling.done:
            self._compiling = Shared(self._compile_all())
        await self._compiling.wait()

    async def _compile_all(self) -> None:
        self._environment = await self._run(self._compiled)
        self.loaded = True

    def _compiled(self) -> Any:
        """A new environment with every page compiled (blocking)."""
        environment = self._build()
        for name in PAGES:
            environment.get_template(name)
        return environment

    def _build(self) -> Any:
        from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

        environment = Environment(loader=FileSystemLoader(os.path.join(HERE, "templates")),
                                  autoescape=select_autoescape(default=True, default_for_string=True),
                                  undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        environment.filters.update(self._filters)
        environment.globals.update(self._globals)
        return environment

    def render(self, name: str, **context: Any) -> str:
        """``name`` rendered; before ``ready`` an environment is built here (error pages only)."""
        if self._environment is None:
            self._environment = self._build()
        return str(self._environment.get_template(name).render(**context))
