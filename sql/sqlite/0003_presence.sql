-- iim presence, SQLite dialect. Keep in step with sql/mysql/0003_presence.sql:
-- the CHECKs give SQLite the limits of the VARCHARs there.
--
-- Per connection: the status and text the connection set last, and when
-- (unix ms; 0 = never set, so a fresh connection's empty text never wins).
-- Existing inserts that name none of these get an `online` session.
ALTER TABLE sessions ADD COLUMN status VARCHAR(16) NOT NULL DEFAULT 'online'
    CHECK (status IN ('online', 'away', 'busy', 'offline'));
ALTER TABLE sessions ADD COLUMN text VARCHAR(140) NOT NULL DEFAULT ''
    CHECK (length(text) <= 140);
ALTER TABLE sessions ADD COLUMN status_at BIGINT NOT NULL DEFAULT 0;

-- Per user: the aggregate over the user's sessions, the truth every server
-- reads. `version` only grows (by one per change); `server_id` is the server
-- that made the change (0: the registry or the exchange). A missing row means
-- offline, empty text, version 0.
CREATE TABLE presence (
    user_id    INTEGER      NOT NULL PRIMARY KEY,
    status     VARCHAR(16)  NOT NULL CHECK (status IN ('online', 'away', 'busy', 'offline')),
    text       VARCHAR(140) NOT NULL CHECK (length(text) <= 140),
    version    BIGINT       NOT NULL CHECK (version >= 0),
    server_id  BIGINT       NOT NULL,
    updated_at BIGINT       NOT NULL
);
