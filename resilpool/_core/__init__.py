"""Internal: the executor core (manager thread, worker loop, wire protocol)."""
