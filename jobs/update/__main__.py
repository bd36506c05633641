from jobs.common.entry import update

update()
