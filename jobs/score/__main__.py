from jobs.common.entry import score

score()
