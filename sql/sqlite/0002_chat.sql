-- iim chat store and user directory, SQLite dialect. Keep in step with
-- sql/mysql/0002_chat.sql: the CHECKs give SQLite the limits of the VARCHARs
-- (characters) and MEDIUMTEXTs (16 MiB - 1 bytes) there.

CREATE TABLE users (
    id         INTEGER      NOT NULL PRIMARY KEY,
    name       VARCHAR(128) NOT NULL CHECK (length(name) <= 128),
    org        VARCHAR(128) NOT NULL CHECK (length(org) <= 128),
    created_at BIGINT       NOT NULL
);

CREATE INDEX users_org_idx ON users (org);

-- One row per direction: (a, b) and (b, a).
CREATE TABLE friendships (
    user_id   BIGINT NOT NULL,
    friend_id BIGINT NOT NULL,
    PRIMARY KEY (user_id, friend_id)
) WITHOUT ROWID;

-- timeline_seq: the last sequence of the group timeline (large groups).
CREATE TABLE chat_groups (
    id           INTEGER      NOT NULL PRIMARY KEY AUTOINCREMENT,
    name         VARCHAR(128) NOT NULL CHECK (length(name) <= 128),
    timeline_seq BIGINT       NOT NULL DEFAULT 0,
    created_at   BIGINT       NOT NULL
);

CREATE TABLE group_members (
    group_id BIGINT NOT NULL,
    user_id  BIGINT NOT NULL,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;

CREATE INDEX group_members_user_idx ON group_members (user_id);

-- The last inbox sequence allocated to each user.
CREATE TABLE user_seq (
    user_id  INTEGER NOT NULL PRIMARY KEY,
    last_seq BIGINT  NOT NULL
);

-- ope: 0 = to a user, 1 = to a group (target is then the group id).
-- (sender, req) is the client's message id: the key of idempotent resends.
CREATE TABLE messages (
    id     INTEGER     NOT NULL PRIMARY KEY AUTOINCREMENT,
    sender BIGINT      NOT NULL,
    req    VARCHAR(64) NOT NULL CHECK (length(req) <= 64),
    ope    INTEGER     NOT NULL CHECK (ope IN (0, 1)),
    target BIGINT      NOT NULL,
    kind   VARCHAR(32) NOT NULL CHECK (length(kind) <= 32),
    body   TEXT        NOT NULL CHECK (length(CAST(body AS BLOB)) <= 16777215),
    ex     TEXT        NULL CHECK (ex IS NULL OR length(CAST(ex AS BLOB)) <= 16777215),
    ts     BIGINT      NOT NULL,
    UNIQUE (sender, req)
);

CREATE TABLE inbox (
    user_id    BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    message_id BIGINT NOT NULL,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;

CREATE INDEX inbox_message_idx ON inbox (message_id);

CREATE TABLE group_timeline (
    group_id   BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    message_id BIGINT NOT NULL,
    PRIMARY KEY (group_id, seq)
) WITHOUT ROWID;

CREATE INDEX group_timeline_message_idx ON group_timeline (message_id);
