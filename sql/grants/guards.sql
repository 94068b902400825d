-- Row guards for the least-privilege accounts of iim (MariaDB / MySQL).
-- Run once per database, after the migrations, by an administrator:
--   mariadb iim < sql/grants/guards.sql
--
-- Table grants cannot say "its own row only"; these triggers do. They look
-- at the connecting account's name (USER(), not the trigger's definer):
--   iim_app_<N>       may write only server N's registry row and sessions;
--   iim_exchange_<N>  may write only exchange N's row among exchanges, and
--                     only exchange N's links.
-- Any other account (an administrator, a shared development account) is
-- not restricted by them.

DROP TRIGGER IF EXISTS iim_servers_guard_insert;
DROP TRIGGER IF EXISTS iim_servers_guard_update;
DROP TRIGGER IF EXISTS iim_servers_guard_delete;
DROP TRIGGER IF EXISTS iim_sessions_guard_insert;
DROP TRIGGER IF EXISTS iim_sessions_guard_update;
DROP TRIGGER IF EXISTS iim_sessions_guard_delete;
DROP TRIGGER IF EXISTS iim_exchange_links_guard_insert;
DROP TRIGGER IF EXISTS iim_exchange_links_guard_delete;
DROP FUNCTION IF EXISTS iim_account_server;
DROP FUNCTION IF EXISTS iim_account_exchange;

DELIMITER //

-- N when the connecting account is iim_app_<N>, else NULL.
CREATE FUNCTION iim_account_server() RETURNS BIGINT NOT DETERMINISTIC READS SQL DATA
BEGIN
    DECLARE who VARCHAR(128) DEFAULT SUBSTRING_INDEX(USER(), '@', 1);
    IF who REGEXP '^iim_app_[0-9]+$' THEN
        RETURN CAST(SUBSTRING(who, 9) AS UNSIGNED);
    END IF;
    RETURN NULL;
END //

-- N when the connecting account is iim_exchange_<N>, else NULL.
CREATE FUNCTION iim_account_exchange() RETURNS BIGINT NOT DETERMINISTIC READS SQL DATA
BEGIN
    DECLARE who VARCHAR(128) DEFAULT SUBSTRING_INDEX(USER(), '@', 1);
    IF who REGEXP '^iim_exchange_[0-9]+$' THEN
        RETURN CAST(SUBSTRING(who, 14) AS UNSIGNED);
    END IF;
    RETURN NULL;
END //

CREATE TRIGGER iim_servers_guard_insert BEFORE INSERT ON servers FOR EACH ROW
BEGIN
    IF (iim_account_server() IS NOT NULL
            AND (NEW.id <> iim_account_server() OR NEW.role <> 'app'))
        OR (iim_account_exchange() IS NOT NULL AND NEW.role = 'exchange'
            AND NEW.id <> iim_account_exchange()) THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'iim: this account may write only its own server''s registry row';
    END IF;
END //

CREATE TRIGGER iim_servers_guard_update BEFORE UPDATE ON servers FOR EACH ROW
BEGIN
    IF (iim_account_server() IS NOT NULL
            AND (OLD.id <> iim_account_server() OR NEW.id <> OLD.id OR NEW.role <> 'app'))
        OR (iim_account_exchange() IS NOT NULL
            AND (NEW.id <> OLD.id OR NEW.role <> OLD.role
                 OR (OLD.role = 'exchange' AND OLD.id <> iim_account_exchange()))) THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'iim: this account may write only its own server''s registry row';
    END IF;
END //

CREATE TRIGGER iim_servers_guard_delete BEFORE DELETE ON servers FOR EACH ROW
BEGIN
    IF iim_account_server() IS NOT NULL OR iim_account_exchange() IS NOT NULL THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'iim: registry rows are removed by an administrator';
    END IF;
END //

CREATE TRIGGER iim_sessions_guard_insert BEFORE INSERT ON sessions FOR EACH ROW
BEGIN
    IF iim_account_server() IS NOT NULL AND NEW.server_id <> iim_account_server() THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'iim: an app server may write only its own sessions';
    END IF;
END //

CREATE TRIGGER iim_sessions_guard_update BEFORE UPDATE ON sessions FOR EACH ROW
BEGIN
    IF iim_account_server() IS NOT NULL
        AND (OLD.server_id <> iim_account_server() OR NEW.server_id <> OLD.server_id) THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'iim: an app server may write only its own sessions';
    END IF;
END //

CREATE TRIGGER iim_sessions_guard_delete BEFORE DELETE ON sessions FOR EACH ROW
BEGIN
    IF iim_account_server() IS NOT NULL AND OLD.server_id <> iim_account_server() THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'iim: an app server may remove only its own sessions';
    END IF;
END //

CREATE TRIGGER iim_exchange_links_guard_insert BEFORE INSERT ON exchange_links FOR EACH ROW
BEGIN
    IF iim_account_exchange() IS NOT NULL AND NEW.exchange_id <> iim_account_exchange() THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'iim: an exchange may record only its own links';
    END IF;
END //

CREATE TRIGGER iim_exchange_links_guard_delete BEFORE DELETE ON exchange_links FOR EACH ROW
BEGIN
    IF iim_account_exchange() IS NOT NULL AND OLD.exchange_id <> iim_account_exchange() THEN
        SIGNAL SQLSTATE '45000'
            SET MESSAGE_TEXT = 'iim: an exchange may remove only its own links';
    END IF;
END //

DELIMITER ;
