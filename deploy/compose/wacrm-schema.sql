-- Wacrm's own tables for the compose stack's demo PostgreSQL, run once by the postgres image
-- on an empty data volume (/docker-entrypoint-initdb.d/10-wacrm-schema.sql; the shipped
-- trigger, loader/wacrm-notify.sql, runs after it as 20-wacrm-notify.sql).  In production the
-- loader reads Wacrm's real database instead, and this file is not used.
-- The loader's tests run against this schema too (tests/loader/conftest.py).
CREATE EXTENSION IF NOT EXISTS pgcrypto;

CREATE TABLE accounts (
  id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name       text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
  id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  account_id   uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
  created_by   uuid,
  name         text NOT NULL,
  key_prefix   text NOT NULL,
  key_hash     text NOT NULL UNIQUE,
  scopes       text[] NOT NULL DEFAULT '{}',
  last_used_at timestamptz,
  expires_at   timestamptz,
  revoked_at   timestamptz,
  created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX api_keys_account_id_idx ON api_keys (account_id);
