"""Bearer API keys, kept only as SHA-256 digests (in memory and in the keys file).

Keys file: one `USER<TAB>SHA256-HEX` line per key (`genlab keys create USER --file F` appends
one and prints the key once). Keys given on the command line are hashed when read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from genlab.errors import DataError, InvalidParameterError


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, digests: dict[str, str] | None = None):
        self.digests = dict(digests or {})  # sha256 hex -> user

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    @classmethod
    def load(cls, keys: list[str] | None = None, file: str | Path | None = None) -> "KeyRing":
        """`keys`: plain keys, or USER=KEY; `file`: a keys file (see the module doc)."""
        ring = cls()
        for i, key in enumerate(keys or []):
            user, _, plain = key.rpartition("=") if "=" in key else (f"key{i + 1}", "", key)
            if len(plain) < 8:
                raise InvalidParameterError("an API key must have at least 8 characters")
            ring.digests[digest(plain)] = user
        if file is not None:
            path = Path(file)
            if not path.is_file():
                raise DataError(f"{path}: no such keys file")
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip() or line.startswith("#"):
                    continue
                user, _, hexdigest = line.partition("\t")
                if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
                    raise DataError(f"{path}:{n}: expected USER<TAB>SHA256-HEX")
                ring.digests[hexdigest] = user
        return ring

    def user(self, authorization: str | None) -> str | None:
        """The user a `Bearer KEY` header belongs to, or None (constant-time comparison)."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        given = digest(authorization[7:].strip())
        found = None
        for known, user in self.digests.items():
            if hmac.compare_digest(given, known):
                found = user
        return found


def create_key(user: str, file: str | Path) -> str:
    """A new random key for `user`: its digest is appended to `file`, the key itself returned."""
    if not user or any(c in user for c in "\t\n"):
        raise InvalidParameterError("the user name must be non-empty, without tabs or newlines")
    key = "gl-" + secrets.token_urlsafe(32)
    path = Path(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{user}\t{digest(key)}\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o600)
    return key
