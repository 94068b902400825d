-- iim read receipts, MySQL / MariaDB dialect. Keep in step with
-- sql/sqlite/0004_receipts.sql: both dialects must mean the same thing.
--
-- How far each user has read each conversation: one row per (reader,
-- conversation), only ever moved forward. ope: 0 = with a user (peer is
-- that user), 1 = a group (peer is the group id). seq is the reader's own
-- position: its inbox sequence (1:1 and small groups) or the group's
-- timeline sequence (large groups). message_id is the last message of the
-- conversation at or below seq (0 when there is none): every member's
-- inbox row for it says where the reader stands in that member's inbox.
CREATE TABLE read_positions (
    user_id    BIGINT  NOT NULL,
    ope        TINYINT NOT NULL,
    peer       BIGINT  NOT NULL,
    seq        BIGINT  NOT NULL,
    message_id BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL,
    PRIMARY KEY (user_id, ope, peer),
    KEY read_positions_peer_idx (ope, peer),
    CONSTRAINT read_positions_ope_ck CHECK (ope IN (0, 1)),
    CONSTRAINT read_positions_seq_ck CHECK (seq >= 0),
    CONSTRAINT read_positions_message_ck CHECK (message_id >= 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
