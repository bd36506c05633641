from jobs.common.entry import demo

demo()
