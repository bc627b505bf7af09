-- Source table read by the `openehr` adapter: the latest version of every composition, as canonical JSON.
-- Created in every site database; idempotent. See 10-site-schema.sql for repl_user.
\set ON_ERROR_STOP on

CREATE SCHEMA IF NOT EXISTS openehr;

CREATE TABLE IF NOT EXISTS openehr.composition (
  uid               text        NOT NULL PRIMARY KEY,  -- versioned object uid (without ::system::version)
  system_id         text        NOT NULL,              -- the openEHR system that created it
  version           integer     NOT NULL DEFAULT 1,
  ehr_id            text        NOT NULL,
  subject_id        text        NOT NULL,              -- EHR_STATUS.subject.external_ref.id
  subject_namespace text        NOT NULL,              -- EHR_STATUS.subject.external_ref.namespace
  template_id       text,
  content           jsonb       NOT NULL,              -- the COMPOSITION, canonical JSON
  updated_at        timestamptz NOT NULL DEFAULT now()
);

-- The before-image of an update is the previous version: the adapter deletes the resources of entries
-- the new version no longer has, and a delete deletes every resource of the composition.
ALTER TABLE openehr.composition REPLICA IDENTITY FULL;

\if :{?repl_user}
ALTER SCHEMA openehr OWNER TO :"repl_user";
ALTER TABLE openehr.composition OWNER TO :"repl_user";
\endif
