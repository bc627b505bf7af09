-- Source table read by the `hl7v2` adapter: the interface engine's inbox of raw HL7 v2 messages (ER7).
-- Created in every site database; idempotent. See 10-site-schema.sql for repl_user.
\set ON_ERROR_STOP on

CREATE SCHEMA IF NOT EXISTS hl7v2;

CREATE TABLE IF NOT EXISTS hl7v2.message (
  id           bigserial   PRIMARY KEY,
  control_id   text        NOT NULL,                  -- MSH-10, for operators
  message_type text        NOT NULL,                  -- MSH-9, e.g. ADT^A08
  message      text        NOT NULL,                  -- the message as received (segments end in CR)
  received_at  timestamptz NOT NULL DEFAULT now(),
  updated_at   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE hl7v2.message REPLICA IDENTITY FULL;

\if :{?repl_user}
ALTER SCHEMA hl7v2 OWNER TO :"repl_user";
ALTER TABLE hl7v2.message OWNER TO :"repl_user";
ALTER SEQUENCE hl7v2.message_id_seq OWNER TO :"repl_user";
\endif
