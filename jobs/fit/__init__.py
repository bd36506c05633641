"""jobs.fit: one Ray task per (category, detector) fits, evaluates, saves and registers a model."""
