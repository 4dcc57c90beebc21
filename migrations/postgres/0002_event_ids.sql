-- Device events carry a unique id so a batch re-sent after a lost acknowledgement is
-- recorded once.
ALTER TABLE events ADD COLUMN event_uid TEXT;
CREATE UNIQUE INDEX events_uid ON events (product, device_id, event_uid);
