"""The admin POST endpoints refuse what a cross-site HTML form can send.

A browser that has Basic credentials for the registry cached sends them
with a form posted from any other site. A form can only send
``application/x-www-form-urlencoded``, ``multipart/form-data`` or
``text/plain``; ``POST /admin/gc`` and ``/admin/prune`` require
``application/json`` (which another origin cannot send without a CORS
preflight that registryd never grants) and refuse a foreign ``Origin``.
``registryd gc --url`` and ``prune --url`` send what is required
(tests/test_upkeep.py and tests/test_prune_online.py run them).
"""
from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from test_security import AuthClient, auth_settings, basic, write_htpasswd

pytestmark = pytest.mark.timeout(60)

FORMS = ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain", None]
ENDPOINTS = ["/admin/gc?delay=0", "/admin/prune?older_than=0&pattern=**"]


@pytest_twisted.ensureDeferred
async def test_admin_posts_refuse_forms_and_other_origins(make_registry: Any, tmp_path: Any) -> None:
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), {"admin": "admin-Secret-1"})
    registry = make_registry(auth=auth_settings(htpasswd, admin_users=("admin",)))
    admin = AuthClient(registry.url, basic("admin", "admin-Secret-1"))
    for path in ENDPOINTS:
        for content_type in FORMS:
            headers = {"Origin": "https://evil.example"} if content_type else {}
            if content_type:
                headers["Content-Type"] = content_type
            reply = await admin.post(path, body=b"a=b", headers=headers, check=False)
            assert reply.status == 415 and reply.codes == ["UNSUPPORTED"], (path, content_type, str(reply))
            assert "application/json" in reply.json()["errors"][0]["message"]
        json_headers = {"Content-Type": "application/json"}
        foreign = await admin.post(path, body=b"{}", headers={**json_headers, "Origin": "https://evil.example"},
                                   check=False)
        assert foreign.status == 403 and foreign.codes == ["DENIED"], str(foreign)
        same = await admin.post(path, body=b"{}", headers={**json_headers, "Origin": registry.url}, check=False)
        assert same.status == 200, str(same)
        plain = await admin.post(path, body=b"{}", headers={**json_headers, "Content-Type": "application/json; "
                                                                          "charset=utf-8"}, check=False)
        assert plain.status == 200, str(plain)
