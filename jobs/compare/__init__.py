"""jobs.compare: the detectors side by side, from what padim-fit and padim-shift left in an output folder."""
