-- PostgreSQL only (a trigger that notifies replicas of release changes); SQLite serves one
-- process, which reloads its cache itself. Kept so both engines number migrations alike.
SELECT 1;
