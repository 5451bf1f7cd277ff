#!/bin/sh
# Demo job runner: runs the job file as a shell script and keeps a log the agent tails.
job_file="$1"
job_id="$2"
mkdir -p /tmp/demo
echo "job $job_id starting on $(hostname)" | tee "/tmp/demo/$job_id.log"
sh "$job_file" 2>&1 | tee -a "/tmp/demo/$job_id.log"
