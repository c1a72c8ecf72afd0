-- Change notifications for the Wacrm gate's loader (optional; the loader's periodic full
-- reconcile works without them, but then a change waits for the next one).
-- Install once into Wacrm's database:  psql "$DATABASE_URL" -f loader/wacrm-notify.sql
-- Remove:  DROP TRIGGER wacrm_gate_key_change ON api_keys;
--          DROP TRIGGER wacrm_gate_account_change ON accounts;
--          DROP FUNCTION wacrm_gate_notify_key(), wacrm_gate_notify_account();
--
-- Each notification on channel "wacrm_gate" names a row, never its state:
--   "k <key id> <key hash> [<old key hash>] @<time>"  a key row was inserted, changed or deleted
--   "a <account id> @<time>"                          an account was renamed or deleted
-- <time> is when the change's transaction began, in Unix seconds (now(), the same for the
-- whole transaction, so PostgreSQL still folds repeated notifications into one); loaders
-- older than this field ignore account notifications that carry it, so upgrade the loader
-- before re-running this file.
-- The loader re-reads the current rows itself.  NOTIFY is sent at commit, so the loader
-- never reads before the change is visible.  Updates that touch only last_used_at or the
-- key's name (which Wacrm makes on every request, or which the gate does not use) are silent.

CREATE OR REPLACE FUNCTION wacrm_gate_notify_key() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  at text := ' @' || extract(epoch FROM now());
BEGIN
  IF TG_OP = 'DELETE' THEN
    PERFORM pg_notify('wacrm_gate', 'k ' || OLD.id || ' ' || OLD.key_hash || at);
  ELSIF TG_OP = 'INSERT' THEN
    PERFORM pg_notify('wacrm_gate', 'k ' || NEW.id || ' ' || NEW.key_hash || at);
  ELSIF (NEW.id, NEW.account_id, NEW.key_prefix, NEW.key_hash, NEW.scopes, NEW.expires_at,
         NEW.revoked_at)
        IS DISTINCT FROM
        (OLD.id, OLD.account_id, OLD.key_prefix, OLD.key_hash, OLD.scopes, OLD.expires_at,
         OLD.revoked_at) THEN
    IF NEW.key_hash IS DISTINCT FROM OLD.key_hash OR NEW.id IS DISTINCT FROM OLD.id THEN
      PERFORM pg_notify('wacrm_gate', 'k ' || OLD.id || ' ' || OLD.key_hash || at);
    END IF;
    PERFORM pg_notify('wacrm_gate', 'k ' || NEW.id || ' ' || NEW.key_hash || at);
  END IF;
  RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION wacrm_gate_notify_account() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  at text := ' @' || extract(epoch FROM now());
BEGIN
  IF TG_OP = 'DELETE' THEN
    PERFORM pg_notify('wacrm_gate', 'a ' || OLD.id || at);
  ELSIF NEW.id IS DISTINCT FROM OLD.id OR NEW.name IS DISTINCT FROM OLD.name THEN
    PERFORM pg_notify('wacrm_gate', 'a ' || OLD.id || at);
    PERFORM pg_notify('wacrm_gate', 'a ' || NEW.id || at);
  END IF;
  RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS wacrm_gate_key_change ON api_keys;
CREATE TRIGGER wacrm_gate_key_change
  AFTER INSERT OR UPDATE OR DELETE ON api_keys
  FOR EACH ROW EXECUTE FUNCTION wacrm_gate_notify_key();

DROP TRIGGER IF EXISTS wacrm_gate_account_change ON accounts;
CREATE TRIGGER wacrm_gate_account_change
  AFTER UPDATE OR DELETE ON accounts
  FOR EACH ROW EXECUTE FUNCTION wacrm_gate_notify_account();
