"""The one exception the auth modules raise for bad configuration."""
from __future__ import annotations


class AuthConfigError(ValueError):
    """An auth, access or TLS setting that cannot be used.

    The message is one line an operator can act on: it names the file, line,
    rule index or key. The config loader turns it into its own ConfigError
    (``raise ConfigError(str(e))``); start-up turns it into ``registryd: ...``
    on stderr.
    """
