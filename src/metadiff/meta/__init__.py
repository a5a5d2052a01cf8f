"""Inner-loop adaptation for many tasks at once (and the per-task reference it is tested against)."""
