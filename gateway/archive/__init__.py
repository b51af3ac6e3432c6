"""The ledger archive in Postgres: ``schema`` (versioned SQL migrations), ``archiver`` (Redis stream →
Postgres, exactly once, then trim), ``reader`` (reports, exports and verify across both stores)."""
