from jobs.common.entry import compare

compare()
