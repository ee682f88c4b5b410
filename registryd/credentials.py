"""Credentials files: one line ``name:secret``, for upstream logins and the S3 keys."""
from __future__ import annotations


def read_credentials_file(path: str, names: tuple[str, str], secret_required: bool = True) -> tuple[str, str]:
    """The two halves of the file's first line; ValueError with one readable line otherwise.

    ``names`` says what the halves are (for the message): ("username", "password").
    """
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().strip()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    name, sep, secret = line.partition(":")
    if not sep or not name or (secret_required and not secret):
        raise ValueError(f"{path} must hold one line '{names[0]}:{names[1]}'")
    return name, secret
