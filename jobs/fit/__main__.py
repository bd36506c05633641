from jobs.common.entry import fit

fit()
