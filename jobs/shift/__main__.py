from jobs.common.entry import shift

shift()
