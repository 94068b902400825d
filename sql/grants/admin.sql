-- The administrator of database ${DB}: runs the migrations (`iimctl
-- migrate`), applies guards.sql, manages the directory (`iimctl user`,
-- `iimctl group`, `iimctl demo-data`) and removes registry rows. Keep its
-- password off the app servers and exchanges. Replace ${DB}, ${PASSWORD}
-- as in appserver.sql.

CREATE USER IF NOT EXISTS 'iim_admin'@'%' IDENTIFIED BY '${PASSWORD}';
GRANT ALL PRIVILEGES ON `${DB}`.* TO 'iim_admin'@'%';
