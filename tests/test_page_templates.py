"""The web UI's templates are compiled at the first page view, in the pool (registryd.web.ui.page_templates)."""
from __future__ import annotations

from typing import Any, Callable

import pytest_twisted

from registryd.web.ui.page_templates import PAGES, PageTemplates


class CountingPool:
    """Runs the callable at once, counting the trips (as the IO pool would run it in a thread)."""

    def __init__(self) -> None:
        self.trips = 0

    async def run(self, fn: Callable[[], Any]) -> Any:
        self.trips += 1
        return fn()


def _templates(pool: CountingPool) -> PageTemplates:
    return PageTemplates({"bytes": str, "short": str, "iso": str}, {"query": lambda **kw: ""}, pool.run)


def test_nothing_is_compiled_before_the_first_page() -> None:
    pool = CountingPool()
    templates = _templates(pool)
    assert not templates.loaded and pool.trips == 0


@pytest_twisted.ensureDeferred
async def test_the_first_page_compiles_every_template_in_one_trip_to_the_pool() -> None:
    pool = CountingPool()
    templates = _templates(pool)
    await templates.ready()
    await templates.ready()
    assert templates.loaded and pool.trips == 1
    compiled = {template.name for template in templates._environment.cache.values()}
    assert set(PAGES) <= compiled


def test_an_error_page_before_any_page_renders_at_once() -> None:
    pool = CountingPool()
    templates = _templates(pool)
    html = templates.render("error.html", version="1", user=None, login_url="/ui/?login", login=False,
                            mirror_link=False, status=404, message="there is no such page", title="404")
    assert "there is no such page" in html and pool.trips == 0


@pytest_twisted.ensureDeferred
async def test_a_page_after_an_error_page_still_compiles_every_template_in_the_pool() -> None:
    pool = CountingPool()
    templates = _templates(pool)
    templates.render("error.html", version="1", user=None, login_url="/ui/?login", login=False,
                     mirror_link=False, status=404, message="there is no such page", title="404")
    await templates.ready()
    assert templates.loaded and pool.trips == 1
    compiled = {template.name for template in templates._environment.cache.values()}
    assert set(PAGES) <= compiled


@pytest_twisted.ensureDeferred
async def test_a_failed_compile_is_tried_again_by_the_next_page() -> None:
    calls: list[int] = []

    async def failing_once(fn: Callable[[], Any]) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("templates unreadable")
        return fn()

    templates = PageTemplates({"bytes": str, "short": str, "iso": str}, {"query": lambda **kw: ""}, failing_once)
    try:
        await templates.ready()
    except OSError:
        pass
    else:
        raise AssertionError("the failure was not reported")
    await templates.ready()
    assert templates.loaded and len(calls) == 2
