"""Studies: a grid specification -> a list of runs; run them (resumable); collect tidy results."""
