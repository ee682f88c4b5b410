"""The web UI: server-rendered pages under ``/ui/`` and their JSON under ``/ui/api/`` (registryd.web.ui.pages)."""
from registryd.web.ui.pages import Gate, WebUI

__all__ = ["Gate", "WebUI"]
