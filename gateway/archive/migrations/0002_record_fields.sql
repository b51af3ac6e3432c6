-- Fields the ledger record gained after 0001: the model the client asked for, the shadow
-- comparison a shadow call carries (issue 15), and the time a request waited in a saturated tier's
-- gateway queue (issue 14). Records archived before this migration read back with the defaults the
-- record itself has for them.
ALTER TABLE ledger_records
    ADD COLUMN model_alias text NOT NULL DEFAULT '',
    ADD COLUMN shadow_of text NOT NULL DEFAULT '',
    ADD COLUMN primary_tier text NOT NULL DEFAULT '',
    ADD COLUMN comparator text NOT NULL DEFAULT '',
    ADD COLUMN score double precision,
    ADD COLUMN agree boolean,
    ADD COLUMN queue_wait_ms double precision NOT NULL DEFAULT 0;
