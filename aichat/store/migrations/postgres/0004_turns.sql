-- Live turns and their events, so that any instance on this database can serve any stream (new tables
-- only: the Go service's tables are left as they are). A turn row is its lease: the instance that runs it
-- (owner) renews lease_until; ended_at is set with the turn's last event. One unended turn per session.
CREATE TABLE chat_turns (
    id           TEXT PRIMARY KEY,
    session_id   VARCHAR(64) NOT NULL,
    user_id      TEXT NOT NULL,
    owner        TEXT NOT NULL,
    lease_until  TIMESTAMPTZ NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    ended_at     TIMESTAMPTZ
);
CREATE UNIQUE INDEX chat_turns_one_live_per_session ON chat_turns (session_id) WHERE ended_at IS NULL;
CREATE INDEX chat_turns_lease ON chat_turns (lease_until) WHERE ended_at IS NULL;
CREATE INDEX chat_turns_ended ON chat_turns (ended_at);

-- A turn's events in order: seq is the SSE event id (1, 2, ... per turn), kind the StreamMessage type,
-- payload its JSON (with our internal "synthetic" mark).
CREATE TABLE turn_events (
    turn_id  TEXT NOT NULL REFERENCES chat_turns (id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    kind     VARCHAR(32) NOT NULL,
    payload  JSONB NOT NULL,
    PRIMARY KEY (turn_id, seq)
);
