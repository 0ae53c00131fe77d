"""Executors launch shard ids of a frozen plan: local (in-process or one process per GPU) or SLURM
(the only module that imports submitit). They pass plain arguments only: the run folder and shard ids."""
