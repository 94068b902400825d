-- iim presence, MySQL / MariaDB dialect. Keep in step with
-- sql/sqlite/0003_presence.sql: both dialects must mean the same thing.
--
-- Per connection: the status and text the connection set last, and when
-- (unix ms; 0 = never set, so a fresh connection's empty text never wins).
-- Existing inserts that name none of these get an `online` session.
ALTER TABLE sessions
    ADD COLUMN status    VARCHAR(16)  NOT NULL DEFAULT 'online',
    ADD COLUMN text      VARCHAR(140) NOT NULL DEFAULT '',
    ADD COLUMN status_at BIGINT       NOT NULL DEFAULT 0,
    ADD CONSTRAINT sessions_status_ck CHECK (status IN ('online', 'away', 'busy', 'offline'));

-- Per user: the aggregate over the user's sessions, the truth every server
-- reads. `version` only grows (by one per change); `server_id` is the server
-- that made the change (0: the registry or the exchange). A missing row means
-- offline, empty text, version 0.
CREATE TABLE presence (
    user_id    BIGINT       NOT NULL,
    status     VARCHAR(16)  NOT NULL,
    text       VARCHAR(140) NOT NULL,
    version    BIGINT       NOT NULL,
    server_id  BIGINT       NOT NULL,
    updated_at BIGINT       NOT NULL,
    PRIMARY KEY (user_id),
    CONSTRAINT presence_status_ck CHECK (status IN ('online', 'away', 'busy', 'offline')),
    CONSTRAINT presence_version_ck CHECK (version >= 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
