"""The ledger archive in Postgres: ``schema`` (versioned SQL migrations), ``archiver`` (Redis stream →
Postgres, exactly once, then trim), ``reader`` (reports, exports and verify across both stores)."""


class ArchiveUnavailable(RuntimeError):
    """Postgres refused or could not be reached (psycopg's error, translated here so that callers
    need not import psycopg to handle it)."""
