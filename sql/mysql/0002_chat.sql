-- iim chat store and user directory, MySQL / MariaDB dialect. Keep in step
-- with sql/sqlite/0002_chat.sql: both dialects must mean the same thing.
--
-- Ids are BIGINT; user ids are u64 stored bit for bit. No foreign keys: the
-- store checks existence itself, and foreign keys would add shared locks on
-- parent rows to the hot send path. `chat_groups`, not `groups`: GROUPS is
-- a reserved word in MySQL 8.

CREATE TABLE users (
    id         BIGINT       NOT NULL,
    name       VARCHAR(128) NOT NULL,
    org        VARCHAR(128) NOT NULL,
    created_at BIGINT       NOT NULL,
    PRIMARY KEY (id),
    KEY users_org_idx (org)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row per direction: (a, b) and (b, a).
CREATE TABLE friendships (
    user_id   BIGINT NOT NULL,
    friend_id BIGINT NOT NULL,
    PRIMARY KEY (user_id, friend_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- timeline_seq: the last sequence of the group timeline (large groups).
CREATE TABLE chat_groups (
    id           BIGINT       NOT NULL AUTO_INCREMENT,
    name         VARCHAR(128) NOT NULL,
    timeline_seq BIGINT       NOT NULL DEFAULT 0,
    created_at   BIGINT       NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE group_members (
    group_id BIGINT NOT NULL,
    user_id  BIGINT NOT NULL,
    PRIMARY KEY (group_id, user_id),
    KEY group_members_user_idx (user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The last inbox sequence allocated to each user. Its row lock is what
-- serialises writers of one inbox.
CREATE TABLE user_seq (
    user_id  BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    PRIMARY KEY (user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- ope: 0 = to a user, 1 = to a group (target is then the group id).
-- (sender, req) is the client's message id: the key of idempotent resends.
CREATE TABLE messages (
    id     BIGINT      NOT NULL AUTO_INCREMENT,
    sender BIGINT      NOT NULL,
    req    VARCHAR(64) NOT NULL,
    ope    TINYINT     NOT NULL,
    target BIGINT      NOT NULL,
    kind   VARCHAR(32) NOT NULL,
    body   MEDIUMTEXT  NOT NULL,
    ex     MEDIUMTEXT  NULL,
    ts     BIGINT      NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY messages_sender_req_uq (sender, req),
    CONSTRAINT messages_ope_ck CHECK (ope IN (0, 1))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE inbox (
    user_id    BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    message_id BIGINT NOT NULL,
    PRIMARY KEY (user_id, seq),
    KEY inbox_message_idx (message_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE group_timeline (
    group_id   BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    message_id BIGINT NOT NULL,
    PRIMARY KEY (group_id, seq),
    KEY group_timeline_message_idx (message_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
