"""htpasswd files for distribution's basic auth (it only accepts bcrypt hashes)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import bcrypt

# Go's bcrypt minimum cost: tests stay fast and distribution still accepts it.
_ROUNDS = 4


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """Write ``user:bcrypt-hash`` lines for each user and password; returns ``path``."""
    lines = []
    for user, password in users.items():
        if ":" in user:
            raise ValueError(f"htpasswd user names cannot contain ':' ({user!r})")
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=_ROUNDS)).decode("ascii")
        lines.append(f"{user}:{hashed}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path
