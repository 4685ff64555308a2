"""The long-running service: daemon, sd_notify and the status row."""
