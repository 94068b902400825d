-- iim exchange attachments, SQLite dialect. Keep in step with
-- sql/mysql/0005_attachments.sql: both dialects must mean the same thing.
--
-- attach_epoch counts the registrations an exchange has recorded for an app
-- server: the exchange that records one sets exchange_id and bumps it, in
-- the same guarded update. It only grows. An exchange's writes about an app
-- server (marking it down, deleting its sessions) name the attach epoch
-- that exchange holds, so an exchange the server has left for another can
-- no longer mark it down (docs/architecture.md, "Several exchanges").
ALTER TABLE servers ADD COLUMN attach_epoch BIGINT NOT NULL DEFAULT 0 CHECK (attach_epoch >= 0);
