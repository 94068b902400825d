-- iim registry, MySQL / MariaDB dialect. Keep in step with sql/sqlite/0001_init.sql:
-- both dialects must mean the same thing (CHECKs mirror the VARCHAR limits there).

CREATE TABLE servers (
    id            BIGINT       NOT NULL,
    role          VARCHAR(16)  NOT NULL,
    address       VARCHAR(255) NOT NULL,
    epoch         BIGINT       NOT NULL,
    state         VARCHAR(16)  NOT NULL,
    exchange_id   BIGINT       NULL,
    registered_at BIGINT       NOT NULL,
    last_seen     BIGINT       NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT servers_role_ck CHECK (role IN ('app', 'exchange')),
    CONSTRAINT servers_state_ck CHECK (state IN ('up', 'draining', 'down'))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE sessions (
    server_id  BIGINT      NOT NULL,
    channel    BIGINT      NOT NULL,
    user_id    BIGINT      NOT NULL,
    device     VARCHAR(64) NOT NULL,
    epoch      BIGINT      NOT NULL,
    created_at BIGINT      NOT NULL,
    PRIMARY KEY (server_id, channel),
    KEY sessions_user_idx (user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
