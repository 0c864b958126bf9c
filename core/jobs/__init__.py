"""Jobs: the row and its state machine, the store, quotas, fair order, running and dispatching."""
