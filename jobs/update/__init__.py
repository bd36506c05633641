"""padim-update: grow fitted models with new normal images (jobs.update.job)."""
