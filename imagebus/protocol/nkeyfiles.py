"""NATS nkey seed files: the key a role proves its identity with.

An nkey is an Ed25519 key pair. Its seed (private, "SU...") stays in a file only its
owner may read; its public key ("U...") goes into the server's configuration, bound to
the role's permissions (protocol/permissions.py). The client signs the server's
challenge with the seed when it connects (nats-py's `nkeys_seed`), so no secret
crosses the wire.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import nkeys


class KeyFileError(ValueError):
    """A seed file that cannot be written or used; the message says which and why."""


# A seed file is a few dozen bytes; reading more than this is reading something else.
_MAX_SEED_FILE_BYTES = 4096


def new_user_seed() -> bytes:
    """A fresh user seed ("SU..."), from the operating system's randomness."""
    return bytes(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    """The public key ("U...") of a user seed; KeyFileError if it is not one."""
    try:
        pair = nkeys.from_seed(bytearray(seed.strip()))
        public = pair.public_key.decode()
    except Exception:  # nkeys raises its own errors, binascii's and ValueError
        raise KeyFileError("not an nkey seed (expected one line starting with SU)") from None
    if not public.startswith("U"):
        raise KeyFileError("an nkey seed, but not a user's (expected one starting with SU)")
    return public


def read_public_key(path: str | Path) -> str:
    """The public key of the user seed in `path`, checking that the file is usable."""
    file = Path(path)
    try:
        with file.open("rb") as f:
            seed = f.read(_MAX_SEED_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{file}: no such file") from None
    except IsADirectoryError:
        raise KeyFileError(f"{file}: a directory, not a seed file") from None
    except OSError as exc:
        raise KeyFileError(f"{file}: cannot read it ({exc.strerror})") from None
    if len(seed) > _MAX_SEED_FILE_BYTES:
        raise KeyFileError(f"{file}: too large to be a seed file")
    try:
        return public_key(seed)
    except KeyFileError as exc:
        raise KeyFileError(f"{file}: {exc}") from None


def write_seed_file(path: str | Path, seed: bytes, *, force: bool = False) -> None:
    """Write `seed` to `path`, readable and writable by its owner only (mode 0600).
    An existing file is kept (KeyFileError) unless `force`."""
    file = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(file, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{file}: exists already (--force replaces it)") from None
    except OSError as exc:
        raise KeyFileError(f"{file}: cannot write it ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # a replaced file keeps no wider mode
        f.write(seed + b"\n")
