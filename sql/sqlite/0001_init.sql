-- iim registry, SQLite dialect. Keep in step with sql/mysql/0001_init.sql:
-- the CHECKs on length() give SQLite the same limits as the VARCHARs there.

CREATE TABLE servers (
    id            INTEGER NOT NULL PRIMARY KEY,
    role          VARCHAR(16)  NOT NULL CHECK (role IN ('app', 'exchange')),
    address       VARCHAR(255) NOT NULL CHECK (length(address) <= 255),
    epoch         BIGINT       NOT NULL,
    state         VARCHAR(16)  NOT NULL CHECK (state IN ('up', 'draining', 'down')),
    exchange_id   BIGINT       NULL,
    registered_at BIGINT       NOT NULL,
    last_seen     BIGINT       NOT NULL
);

CREATE TABLE sessions (
    server_id  BIGINT      NOT NULL,
    channel    BIGINT      NOT NULL,
    user_id    BIGINT      NOT NULL,
    device     VARCHAR(64) NOT NULL CHECK (length(device) <= 64),
    epoch      BIGINT      NOT NULL,
    created_at BIGINT      NOT NULL,
    PRIMARY KEY (server_id, channel)
);

CREATE INDEX sessions_user_idx ON sessions (user_id);
