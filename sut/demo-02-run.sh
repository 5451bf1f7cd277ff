#!/bin/sh
# Demo job runner: runs the job file as a shell script, keeps a log the agent tails
# (tail = ["/tmp/demo/*.log"]) and exits with the job's status.
job_file="$1"
job_id="$2"
mkdir -p /tmp/demo
log="/tmp/demo/$job_id.log"
echo "job $job_id starting on $(hostname)" | tee "$log"
{ sh "$job_file" 2>&1; echo $? > "/tmp/demo/$job_id.status"; } | tee -a "$log"
exit "$(cat "/tmp/demo/$job_id.status")"
