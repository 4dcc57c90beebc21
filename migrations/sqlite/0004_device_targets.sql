-- What a device runs, reported at enrollment: releases can target platforms and CPU
-- architectures (manifest compatibility.platforms / .architectures).
ALTER TABLE devices ADD COLUMN platform TEXT;
ALTER TABLE devices ADD COLUMN architecture TEXT;
