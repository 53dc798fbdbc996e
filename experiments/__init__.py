"""Tasks, run configs, the run loop and the time-to-accuracy clock."""
