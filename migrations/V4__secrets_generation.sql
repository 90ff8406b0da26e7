-- V4: a datasource's secrets generation, bumped by every put or delete of one of its secrets
-- (not by a rewrap, which changes no credential). It is part of what makes a running worker
-- current, so a credential change hot-reloads the worker through the normal path.

ALTER TABLE datasource_state ADD COLUMN secrets_generation bigint NOT NULL DEFAULT 0;
