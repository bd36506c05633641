"""jobs.demo: the main job on embedded defaults (demo data, padim-fit, padim-score)."""
