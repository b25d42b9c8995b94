"""``make migrate``: apply every service's schema migrations to its configured database.

Each service's database is where the service itself would open it (``<SERVICE>_DATABASE_URL``,
the shared ``DATABASE_URL`` with a schema per service, else ``var/<name>.db``); each store's
migrations and the base's own tables are applied there, under the database's write lock, as
at a service's start. One line per service says what was applied.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from services.mesh.bootstrap import StartupError, database_target
from services.mesh.topology import SERVICES
from services.storage import sql

#: Stores beyond ``<service module>.store``, by service (two stores share one database).
EXTRA_STORES: Mapping[str, tuple[str, ...]] = {
    "notification-service": ("services.notification.secret_store",),
}


def schemas_of(service: str, module: str) -> list[str]:
    """The ``SCHEMA`` (migrations) of each store of a service."""
    names = (f"{module}.store", *EXTRA_STORES.get(service, ()))
    return [importlib.import_module(name).SCHEMA for name in names]


def migrate_all(environ: Mapping[str, str]) -> list[str]:
    """Migrate every service's database; one report line per service.

    Raises:
        StartupError: a service's database URL is not one this build serves.
    """
    lines: list[str] = []
    for spec in SERVICES:
        target = database_target(spec.name, environ)
        if isinstance(target, Path):
            target.parent.mkdir(parents=True, exist_ok=True)
        applied: list[str] = []
        for schema in schemas_of(spec.name, spec.module):
            db = sql.Database(target, schema)
            applied.extend(db.applied)
            db.close()
        done = ", ".join(applied) if applied else "up to date"
        lines.append(f"{spec.name:<24} {sql.describe(target)}: {done}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print what was applied; exit 2 naming a bad URL, 1 when a database refuses."""
    del argv
    try:
        for line in migrate_all(os.environ):
            print(line, flush=True)
    except StartupError as exc:
        print(exc, file=sys.stderr)
        return 2
    except sql.DatabaseError as exc:
        print(f"migration failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
