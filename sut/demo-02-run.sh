#!/bin/sh
# Demo job runner: runs the job file as a shell script and exits with its status. It also keeps
# a one-line summary per job in /tmp/demo/, which the agent follows (tail = ["/tmp/demo/*.log"]).
job_file="$1"
job_id="$2"
mkdir -p /tmp/demo
echo "job $job_id starting on $(hostname)"
sh "$job_file"
status=$?
echo "job $job_id ended with status $status" >> "/tmp/demo/$job_id.log"
exit "$status"
