-- The account of app server ${ID} on database ${DB} (MariaDB / MySQL).
-- Replace ${DB}, ${ID}, ${PASSWORD} (and '%' with the app server's host),
-- for example:
--   sed -e 's/${DB}/iim/g' -e 's/${ID}/1/g' -e "s/\${PASSWORD}/$(cat pw)/g" \
--       sql/grants/appserver.sql | mariadb
-- Needs sql/grants/guards.sql applied: the account name iim_app_<id> is
-- what limits it to its own registry row and sessions.

CREATE USER IF NOT EXISTS 'iim_app_${ID}'@'%' IDENTIFIED BY '${PASSWORD}';

-- Read at start: is the schema migrated?
GRANT SELECT ON `${DB}`.`_sqlx_migrations` TO 'iim_app_${ID}'@'%';
-- Registry: its own row (guarded), everybody's to read.
GRANT SELECT, INSERT, UPDATE ON `${DB}`.`servers` TO 'iim_app_${ID}'@'%';
-- Its own sessions (guarded; a session's status is updated in place);
-- everybody's to read (user_list).
GRANT SELECT, INSERT, UPDATE, DELETE ON `${DB}`.`sessions` TO 'iim_app_${ID}'@'%';
-- The directory, read only.
GRANT SELECT ON `${DB}`.`users` TO 'iim_app_${ID}'@'%';
GRANT SELECT ON `${DB}`.`friendships` TO 'iim_app_${ID}'@'%';
GRANT SELECT ON `${DB}`.`chat_groups` TO 'iim_app_${ID}'@'%';
GRANT SELECT ON `${DB}`.`group_members` TO 'iim_app_${ID}'@'%';
-- The message store: messages are written once, never changed or deleted.
GRANT SELECT, INSERT, UPDATE ON `${DB}`.`user_seq` TO 'iim_app_${ID}'@'%';
GRANT SELECT, INSERT ON `${DB}`.`messages` TO 'iim_app_${ID}'@'%';
GRANT SELECT, INSERT ON `${DB}`.`inbox` TO 'iim_app_${ID}'@'%';
GRANT SELECT, INSERT ON `${DB}`.`group_timeline` TO 'iim_app_${ID}'@'%';
-- Presence of the users connected to it (a row back at version 0 is
-- removed).
GRANT SELECT, INSERT, UPDATE, DELETE ON `${DB}`.`presence` TO 'iim_app_${ID}'@'%';
-- Read receipts: a reader's position only moves forward (updated in place),
-- never deleted.
GRANT SELECT, INSERT, UPDATE ON `${DB}`.`read_positions` TO 'iim_app_${ID}'@'%';
