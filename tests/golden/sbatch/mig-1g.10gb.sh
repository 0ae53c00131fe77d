#!/bin/bash

# Parameters
#SBATCH --array=0-3%4
#SBATCH --cpus-per-task=2
#SBATCH --error=/runs/demo/slurm/%A_%a/%A_%a_0_log.err
#SBATCH --gres=gpu:1g.10gb:1
#SBATCH --job-name=masklet
#SBATCH --mem=16GB
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/runs/demo/slurm/%A_%a/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=240
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /runs/demo/slurm/%A_%a/%A_%a_%t_log.out --error /runs/demo/slurm/%A_%a/%A_%a_%t_log.err /opt/masklet/.venv/bin/python -u -m submitit.core._submit /runs/demo/slurm/%j
