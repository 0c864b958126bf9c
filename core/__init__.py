"""Everything that is not Discord: audio I/O, separation, jobs, quotas, storage. Never imports discord."""
