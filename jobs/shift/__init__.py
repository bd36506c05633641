"""jobs.shift: each fitted model's test split scored under controlled domain shifts, and a report."""
