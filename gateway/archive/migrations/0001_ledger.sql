-- The ledger archive: every record once (by request id), the per-day rollup reports read, and how far
-- the Redis stream has been archived. Money stays exact: prices and costs are the decimal strings the
-- gateway wrote (a price is part of a group's name, "2.50" and "2.5" are different groups, as in Redis).

CREATE TABLE ledger_records (
    request_id text PRIMARY KEY,
    stream_ms bigint NOT NULL,            -- the record's Redis stream id, <ms>-<seq>: write order
    stream_seq bigint NOT NULL,
    day date NOT NULL,                    -- UTC day the request arrived (LedgerRecord.day)
    time double precision NOT NULL,
    tenant text NOT NULL,
    key_id text NOT NULL,
    route text NOT NULL,
    tier text NOT NULL,
    model text NOT NULL,
    worker text NOT NULL,
    policy text NOT NULL,
    prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    prompt_tokens_estimate bigint NOT NULL,
    price_input text NOT NULL,
    price_output text NOT NULL,
    cost_usd text NOT NULL,
    outcome text NOT NULL,
    attempts integer NOT NULL,
    ttfb_ms double precision,
    latency_ms double precision NOT NULL,
    task text,
    stream boolean NOT NULL,
    max_tokens bigint,
    endpoint text NOT NULL,
    cached_tokens bigint NOT NULL,
    price_cached_input text NOT NULL
);
CREATE UNIQUE INDEX ledger_records_stream_id ON ledger_records (stream_ms, stream_seq);  -- export order
CREATE INDEX ledger_records_day_worker ON ledger_records (day, worker);  -- export by day, GPU cost per worker

-- One row per report group and day, maintained in the same transaction as the inserts it counts:
-- a report reads these few rows, not the records.
CREATE TABLE ledger_rollup (
    day date NOT NULL,
    tenant text NOT NULL,
    tier text NOT NULL,
    route text NOT NULL,
    model text NOT NULL,
    price_input text NOT NULL,
    price_output text NOT NULL,
    price_cached_input text NOT NULL,
    requests bigint NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cached_tokens bigint NOT NULL,
    PRIMARY KEY (day, tenant, tier, route, model, price_input, price_output, price_cached_input)
);

-- The last stream id committed here. Redis trims only at or below it.
CREATE TABLE ledger_archive_state (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_ms bigint NOT NULL,
    last_seq bigint NOT NULL
);
INSERT INTO ledger_archive_state VALUES (true, 0, 0);
