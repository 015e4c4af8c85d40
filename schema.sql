-- casfs metadata schema: the single source of truth.
-- Loaded by `casfs init` into the volume's database. Statements end with ';' at end of line.
-- Bump schema_version (and cas/db/database.py SCHEMA_VERSION) on any change; casfs refuses a
-- database whose version differs.

CREATE TABLE meta (
    k VARCHAR(64) NOT NULL PRIMARY KEY,
    v VARCHAR(255) NOT NULL
) ENGINE=InnoDB;

INSERT INTO meta (k, v) VALUES ('schema_version', '5');

-- One row per inode. Times in ns since the epoch. nlink = 0 marks a file unlinked while
-- still open; it is freed at its last release (or at the next mount after a crash).
-- data_bytes: bytes of the file that lie in stored (non-hole) slots, so st_blocks counts
-- what is stored, not holes (schema 3).
CREATE TABLE inodes (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    mode INT UNSIGNED NOT NULL,
    uid INT UNSIGNED NOT NULL,
    gid INT UNSIGNED NOT NULL,
    nlink INT UNSIGNED NOT NULL,
    size BIGINT UNSIGNED NOT NULL DEFAULT 0,
    rdev BIGINT UNSIGNED NOT NULL DEFAULT 0,
    atime_ns BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    ctime_ns BIGINT NOT NULL,
    data_bytes BIGINT UNSIGNED NOT NULL DEFAULT 0,
    KEY nlink_idx (nlink)
) ENGINE=InnoDB;

-- Directory entries. id is the stable readdir offset of the entry.
CREATE TABLE dentries (
    parent BIGINT UNSIGNED NOT NULL,
    name VARBINARY(255) NOT NULL,
    inode BIGINT UNSIGNED NOT NULL,
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    PRIMARY KEY (parent, name),
    UNIQUE KEY id_idx (id),
    KEY parent_id_idx (parent, id),
    KEY inode_idx (inode)
) ENGINE=InnoDB;

CREATE TABLE symlinks (
    inode BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    target VARBINARY(4096) NOT NULL
) ENGINE=InnoDB;

-- name_idx: `casfs find --xattr KEY[=VALUE]` over the whole volume (cas/maint/find.py) reads
-- the inodes holding an attribute from it instead of scanning the table (needs the schema
-- migration that adds it: ALTER TABLE xattrs ADD KEY name_idx (name, value(64))).
CREATE TABLE xattrs (
    inode BIGINT UNSIGNED NOT NULL,
    name VARBINARY(255) NOT NULL,
    value MEDIUMBLOB NOT NULL,
    PRIMARY KEY (inode, name),
    KEY name_idx (name, value(64))
) ENGINE=InnoDB;

-- Chunks: id = SHA-256 of the plaintext. length = plaintext bytes; stored_length = bytes
-- of the envelope in the local store. refcount = number of manifest slots naming it.
-- zero_since: server time when refcount last reached 0 (NULL while referenced); gc
-- deletes a chunk only when it has been zero for longer than the grace period.
-- bad = 1: the local copy failed verification; dedup never points new data at it, the
-- next write of the same bytes rewrites it, and fsck --repair can replace it from a
-- confirmed cloud copy (schema 3).
CREATE TABLE chunks (
    id BINARY(32) NOT NULL PRIMARY KEY,
    length INT UNSIGNED NOT NULL,
    stored_length INT UNSIGNED NOT NULL,
    refcount BIGINT NOT NULL,
    zero_since DATETIME(6) NULL,
    created DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    is_local TINYINT NOT NULL DEFAULT 1,
    bad TINYINT NOT NULL DEFAULT 0,
    KEY zero_idx (refcount, zero_since),
    KEY bad_idx (bad)
) ENGINE=InnoDB;

-- File manifests: slot i of inode covers bytes [i*chunk_size, (i+1)*chunk_size).
-- A slot with no row is a hole (reads as zeros).
CREATE TABLE manifests (
    inode BIGINT UNSIGNED NOT NULL,
    slot BIGINT UNSIGNED NOT NULL,
    chunk BINARY(32) NOT NULL,
    PRIMARY KEY (inode, slot),
    KEY chunk_idx (chunk)
) ENGINE=InnoDB;

-- The cloud tier (cas/tier/cloud.py, docs/cloud.md). A pack is one object in the cloud store
-- (a Drive file) holding chunk envelopes back to back. name is chosen before the upload
-- starts (so a crash leaves a recognisable object); object_id is the store's id once
-- the upload is confirmed (size, md5 and sha256 compared). An 'uploading' pack is owned
-- by one uploader (owner = host:pid:token) until lease_until.
CREATE TABLE packs (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name VARCHAR(64) NOT NULL,
    state ENUM('uploading', 'confirmed') NOT NULL,
    object_id VARCHAR(128) NULL,
    size BIGINT UNSIGNED NOT NULL,
    md5 BINARY(16) NOT NULL,
    sha256 BINARY(32) NOT NULL,
    owner VARCHAR(128) NULL,
    lease_until DATETIME(6) NULL,
    created DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    confirmed DATETIME(6) NULL,
    UNIQUE KEY name_idx (name),
    KEY state_idx (state)
) ENGINE=InnoDB;

-- Where a chunk's confirmed cloud copy is: bytes [pos, pos + length) of a pack.
-- One row per chunk at most: a chunk confirmed in a pack is never uploaded again.
CREATE TABLE pack_entries (
    chunk BINARY(32) NOT NULL PRIMARY KEY,
    pack BIGINT UNSIGNED NOT NULL,
    pos BIGINT UNSIGNED NOT NULL,
    length INT UNSIGNED NOT NULL,
    KEY pack_idx (pack)
) ENGINE=InnoDB;

-- The persistent upload queue: chunks stored locally and not yet confirmed in the cloud.
-- A row is added in the transaction that creates the chunk row (when the cloud tier is
-- enabled: meta key cloud_enabled). pack, pos and length are set when an uploader claims the row
-- for a pack; the row is deleted when that pack is confirmed.
-- store (schema 5): the local chunk store that holds the chunk's bytes until the upload
-- (cas.config.volume.Volume.store); NULL in rows queued before schema 5, which belong to
-- the volume's first store. Only a mount of that store claims the row (docs/sharing.md).
CREATE TABLE upload_queue (
    chunk BINARY(32) NOT NULL PRIMARY KEY,
    queued DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    pack BIGINT UNSIGNED NULL,
    pos BIGINT UNSIGNED NULL,
    length INT UNSIGNED NULL,
    store CHAR(32) NULL,
    KEY pack_idx (pack, queued),
    KEY store_idx (store, pack)
) ENGINE=InnoDB;

-- Metadata snapshots on the cloud store (cas/tier/snapshot.py, docs/backup.md): the packs
-- (by name, as on the store) that each snapshot generation still kept on the store names.
-- gc never deletes or rewrites a pack named here; retention deletes a generation's rows
-- after deleting its snapshot object.
CREATE TABLE snapshot_packs (
    generation BIGINT UNSIGNED NOT NULL,
    pack VARCHAR(64) NOT NULL,
    PRIMARY KEY (generation, pack),
    KEY pack_idx (pack)
) ENGINE=InnoDB;

-- Mount sessions (schema 5; cas/db/sessions.py, docs/sharing.md): one row per running
-- mount of the volume, on any machine. heartbeat is server time, renewed every few
-- seconds; a session whose heartbeat is older than the timeout is dead and any live mount
-- reaps it. store: the session's local chunk store (cas.config.volume.Volume.store).
-- mode 'exclusive': a mount of a volume that is not shared (meta key shared); it refuses
-- to start beside any other live session, and a shared mount refuses beside it.
CREATE TABLE sessions (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    host VARCHAR(255) NOT NULL,
    pid INT UNSIGNED NOT NULL,
    store CHAR(32) NOT NULL,
    mode ENUM('exclusive', 'shared') NOT NULL,
    consistency VARCHAR(16) NOT NULL,
    started DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    heartbeat DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY heartbeat_idx (heartbeat)
) ENGINE=InnoDB;

-- Sustained inodes (schema 5): an inode unlinked (nlink = 0) while session `session`
-- still had it open. It is freed at that session's last release, or when the session is
-- reaped; a mount frees at start only nlink = 0 inodes no live session sustains.
CREATE TABLE sustained (
    session BIGINT UNSIGNED NOT NULL,
    inode BIGINT UNSIGNED NOT NULL,
    PRIMARY KEY (session, inode),
    KEY inode_idx (inode)
) ENGINE=InnoDB;

-- The change log of a shared volume (schema 5; cas/db/changes.py, docs/sharing.md): one
-- row per inode (and, for namespace changes, per dentry parent/name) a session changed,
-- written in the transaction that changes it. Other sessions poll it to drop their RAM
-- and kernel caches. AUTO_INCREMENT ids are not commit order: pollers re-read a window.
-- Rows older than a few minutes are deleted by any mount.
CREATE TABLE changes (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    session BIGINT UNSIGNED NOT NULL,
    inode BIGINT UNSIGNED NOT NULL,
    parent BIGINT UNSIGNED NULL,
    name VARBINARY(255) NULL,
    at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY at_idx (at)
) ENGINE=InnoDB;
