"""Reports a user reads offline: the clustering's inspection report (and, from evaluation, its own)."""
