"""jobs.score: Ray Data scores image sets from folders, archives and Parquet into Parquet score tables."""
