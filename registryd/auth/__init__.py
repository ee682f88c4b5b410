"""Protecting a node: who is asking, what they may do, and TLS.

- ``htpasswd``: HtpasswdChecker, a twisted.cred checker over a bcrypt
  htpasswd file (cached, re-read on change and on reload).
- ``throttle``: Throttle, backoff for addresses that keep failing.
- ``basic``: BasicAuthenticator, the Authorization header of one request
  through throttle and checker to a user name.
- ``policy``: AccessPolicy and the ``[[access]]`` rules.
- ``settings``: the ``[auth]`` table and ``build_auth``.
- ``tls``: ServerTLSContext and TLSServerEndpoint for TLS listeners.
- ``htpasswd_file``: the file edits behind ``registryd htpasswd``.

Configuration problems raise AuthConfigError (one line).
"""
from registryd.auth.errors import AuthConfigError

__all__ = ["AuthConfigError"]
