-- Replicas cache the live releases and trust roots; any change to those tables, by any
-- replica or by hand, notifies channel flotilla_cache so every replica reloads at once
-- (the periodic reload stays as a backstop).
CREATE FUNCTION flotilla_cache_changed() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('flotilla_cache', TG_TABLE_NAME);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER releases_cache_changed AFTER INSERT OR UPDATE OR DELETE ON releases
    FOR EACH STATEMENT EXECUTE FUNCTION flotilla_cache_changed();
CREATE TRIGGER products_cache_changed AFTER INSERT OR UPDATE OR DELETE ON products
    FOR EACH STATEMENT EXECUTE FUNCTION flotilla_cache_changed();
