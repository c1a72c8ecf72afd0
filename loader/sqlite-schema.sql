-- The key table for standalone installs: Wacrm's columns, in SQLite's types.
-- Applied by the loader whenever it opens the file (every statement is IF NOT EXISTS).
--   ids          TEXT holding a UUID
--   scopes       TEXT holding a JSON array of strings, e.g. '["messages:send"]'
--   timestamps   TEXT in ISO 8601, UTC, e.g. '2025-01-31T12:00:00.000Z'
-- wacrm_changes is the loader's change log: triggers append the rows a change touched and
-- the loader, on seeing PRAGMA data_version move, re-reads those rows.

PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS accounts (
  id   TEXT PRIMARY KEY,
  name TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS api_keys (
  id           TEXT PRIMARY KEY,
  account_id   TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  created_by   TEXT,
  name         TEXT NOT NULL,
  key_prefix   TEXT NOT NULL,
  key_hash     TEXT NOT NULL UNIQUE,
  scopes       TEXT NOT NULL DEFAULT '[]',
  last_used_at TEXT,
  expires_at   TEXT,
  revoked_at   TEXT,
  created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX IF NOT EXISTS api_keys_account_id ON api_keys (account_id);

CREATE TABLE IF NOT EXISTS wacrm_changes (
  seq        INTEGER PRIMARY KEY AUTOINCREMENT,
  key_id     TEXT,
  key_hash   TEXT,
  account_id TEXT,
  changed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TRIGGER IF NOT EXISTS wacrm_key_insert AFTER INSERT ON api_keys BEGIN
  INSERT INTO wacrm_changes (key_id, key_hash) VALUES (NEW.id, NEW.key_hash);
END;

CREATE TRIGGER IF NOT EXISTS wacrm_key_update AFTER UPDATE ON api_keys
WHEN NEW.id IS NOT OLD.id OR NEW.account_id IS NOT OLD.account_id
  OR NEW.key_prefix IS NOT OLD.key_prefix OR NEW.key_hash IS NOT OLD.key_hash
  OR NEW.scopes IS NOT OLD.scopes OR NEW.expires_at IS NOT OLD.expires_at
  OR NEW.revoked_at IS NOT OLD.revoked_at
BEGIN
  INSERT INTO wacrm_changes (key_id, key_hash) VALUES (OLD.id, OLD.key_hash);
  INSERT INTO wacrm_changes (key_id, key_hash) VALUES (NEW.id, NEW.key_hash);
END;

CREATE TRIGGER IF NOT EXISTS wacrm_key_delete AFTER DELETE ON api_keys BEGIN
  INSERT INTO wacrm_changes (key_id, key_hash) VALUES (OLD.id, OLD.key_hash);
END;

CREATE TRIGGER IF NOT EXISTS wacrm_account_update AFTER UPDATE OF id, name ON accounts BEGIN
  INSERT INTO wacrm_changes (account_id) VALUES (OLD.id);
  INSERT INTO wacrm_changes (account_id) VALUES (NEW.id);
END;

CREATE TRIGGER IF NOT EXISTS wacrm_account_delete AFTER DELETE ON accounts BEGIN
  INSERT INTO wacrm_changes (account_id) VALUES (OLD.id);
END;
