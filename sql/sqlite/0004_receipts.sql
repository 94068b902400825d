-- iim read receipts, SQLite dialect. Keep in step with
-- sql/mysql/0004_receipts.sql.
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
    ope        INTEGER NOT NULL CHECK (ope IN (0, 1)),
    peer       BIGINT  NOT NULL,
    seq        BIGINT  NOT NULL CHECK (seq >= 0),
    message_id BIGINT  NOT NULL CHECK (message_id >= 0),
    updated_at BIGINT  NOT NULL,
    PRIMARY KEY (user_id, ope, peer)
) WITHOUT ROWID;

-- The others' positions in a user's conversations (read_state).
CREATE INDEX read_positions_peer_idx ON read_positions (ope, peer);
