"""The daemon's process lifecycle: start-up checks, run state, the per-mode services."""
