-- The account of exchange ${ID} on database ${DB} (MariaDB / MySQL).
-- Replace ${DB}, ${ID}, ${PASSWORD} (and '%' with the exchange's host) as
-- in appserver.sql. Needs sql/grants/guards.sql applied.

CREATE USER IF NOT EXISTS 'iim_exchange_${ID}'@'%' IDENTIFIED BY '${PASSWORD}';

GRANT SELECT ON `${DB}`.`_sqlx_migrations` TO 'iim_exchange_${ID}'@'%';
-- Its own row; app servers' rows: registration, leases (marked down).
GRANT SELECT, INSERT, UPDATE ON `${DB}`.`servers` TO 'iim_exchange_${ID}'@'%';
-- A server marked down loses its sessions, and their users' presence is
-- recomputed.
GRANT SELECT, DELETE ON `${DB}`.`sessions` TO 'iim_exchange_${ID}'@'%';
GRANT SELECT, INSERT, UPDATE, DELETE ON `${DB}`.`presence` TO 'iim_exchange_${ID}'@'%';
-- Its live links to other exchanges (its own rows only: guards.sql).
GRANT SELECT, INSERT, DELETE ON `${DB}`.`exchange_links` TO 'iim_exchange_${ID}'@'%';
