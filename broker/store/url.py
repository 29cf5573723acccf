"""Store URLs: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite://`` (memory), or
``postgresql://user:pass@host:port/db?schema=name`` (``schema`` is ours: the search path to use;
every other parameter goes to libpq). A URL prints without its password."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from broker.errors import ConfigurationError

_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*(@)")


@dataclass(frozen=True)
class StoreURL:
    dialect: str  # "sqlite" | "postgresql"
    #: sqlite: the file path (or ":memory:"); postgresql: the libpq URI without our own parameters
    dsn: str
    schema: str | None = None

    @classmethod
    def parse(cls, url: str) -> StoreURL:
        url = url.strip()
        if url.startswith("sqlite:"):
            rest = url[len("sqlite:"):]
            if rest in ("", "//", "///:memory:", "//:memory:"):
                return cls("sqlite", ":memory:")
            if not rest.startswith("///"):
                raise ConfigurationError(f"a SQLite URL is sqlite:///path (got {url!r})")
            return cls("sqlite", str(Path(rest[3:]).expanduser()))
        parts = urlsplit(url)
        if parts.scheme in ("postgresql", "postgres"):
            query = parse_qsl(parts.query, keep_blank_values=True)
            schema = next((v for k, v in query if k == "schema"), None)
            if schema is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
                raise ConfigurationError(f"schema must be a plain identifier (got {schema!r})")
            rest = urlencode([(k, v) for k, v in query if k != "schema"])
            dsn = urlunsplit(("postgresql", parts.netloc, parts.path, rest, parts.fragment))
            return cls("postgresql", dsn, schema)
        raise ConfigurationError(f"unknown store URL {redact(url)!r}: use sqlite:///path or postgresql://…")

    def redact(self, text: str) -> str:
        return redact(text)

    def __str__(self) -> str:
        if self.dialect == "sqlite":
            return f"sqlite:///{self.dsn}" if self.dsn != ":memory:" else "sqlite://"
        return redact(self.dsn) + (f" (schema {self.schema})" if self.schema else "")


def redact(text: str) -> str:
    """``text`` with any URL password replaced by ``***``."""
    return _PASSWORD.sub(r"\1***\2", text)
