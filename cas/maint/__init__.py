"""Maintenance and reports: gc, fsck and repair, scrub, the cloud check, stats, find, du."""
