-- Source table read by the `fhir` adapter, created in every site database (and in `central`).
-- Applied by compose/native/postgres.sh with psql as the superuser; idempotent, safe to re-run.
-- psql variable repl_user (psql -v repl_user=...) names the Debezium replication role: it must OWN the table
-- so that Debezium's publication.autocreate.mode=filtered can run CREATE PUBLICATION ... FOR TABLE fhir.resource.
\set ON_ERROR_STOP on

CREATE SCHEMA IF NOT EXISTS fhir;

CREATE TABLE IF NOT EXISTS fhir.resource (
  resource_type text        NOT NULL,
  id            text        NOT NULL,
  version       integer     NOT NULL DEFAULT 1,
  content       jsonb       NOT NULL,
  updated_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (resource_type, id)
);

-- Deletes and updates carry the whole old row in Debezium's `before`, not only the key.
ALTER TABLE fhir.resource REPLICA IDENTITY FULL;

\if :{?repl_user}
ALTER SCHEMA fhir OWNER TO :"repl_user";
ALTER TABLE fhir.resource OWNER TO :"repl_user";
\endif
