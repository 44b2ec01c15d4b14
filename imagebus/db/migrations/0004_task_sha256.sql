-- The SHA-256 of each image made, as its worker reported it: a fetch by job id alone
-- takes from the results stream only a kept copy with this digest (any worker's key
-- may publish a copy there).

ALTER TABLE tasks ADD COLUMN sha256 text;
