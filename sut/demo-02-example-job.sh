# Example job for demo-02: any shell script. Submit your own in its place.
echo "uname: $(uname -a)"
echo "uptime: $(cat /proc/uptime)"
