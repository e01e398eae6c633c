"""`make bench`: data path, snapshots, control path and scale figures for Stowage."""
