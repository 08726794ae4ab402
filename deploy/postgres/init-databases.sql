-- Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d), as
-- the `steward` role that POSTGRES_USER creates. One database per service, and the consent
-- service's key store apart from its data, so a backup or a copy of one never carries the
-- others and each can move to a server of its own. Migrations create the tables (`migrate`).
CREATE DATABASE consent;
CREATE DATABASE keystore;
CREATE DATABASE identity;
CREATE DATABASE tagging;
CREATE DATABASE recommend;
