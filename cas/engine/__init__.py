"""The filesystem engine: the POSIX namespace and file operations, per-file data and
writeback, xattrs, sync status, the rescue area. What the FUSE layer calls."""
