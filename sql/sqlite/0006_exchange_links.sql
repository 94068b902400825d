-- iim links between exchanges, SQLite dialect. Keep in step with
-- sql/mysql/0006_exchange_links.sql: both dialects must mean the same thing.
--
-- Each exchange records the peer exchanges it has a live link to, replacing
-- its own rows when the set changes (at a sweep), for operators to see
-- (`iimctl servers`). since_ms is when the link was first recorded up. Rows
-- of an exchange that died stay until it starts again: read them together
-- with the exchange's row (state, last_seen). Nothing routes by this table.
--
-- links_epoch and links_seq on the exchange's own servers row fence the
-- recordings: a recording applies only above the (epoch, seq) stored there,
-- so one that an exchange gave up on and that commits late cannot undo a
-- newer one.
CREATE TABLE exchange_links (
    exchange_id BIGINT NOT NULL,
    peer_id     BIGINT NOT NULL,
    since_ms    BIGINT NOT NULL,
    PRIMARY KEY (exchange_id, peer_id)
);
ALTER TABLE servers ADD COLUMN links_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE servers ADD COLUMN links_seq BIGINT NOT NULL DEFAULT 0;
