#!/bin/sh
# disk_usage: one line per mounted file system, every 60 s (the directory name is the interval).
#
# An example of a collector in plain POSIX shell. It prints the line protocol itself
#     PROD DATE DATA        e.g.  disk_usage 2024-06-01 mount=/ fs=/dev/sda1 used_kb=... used_pct=22
# unless its settings say format = "raw", in which case it prints only DATA and the agent adds
# PROD (the collector's `prod` setting, default its name) and DATE (the agent's local date):
#     [collectors.disk_usage]
#     format = "raw"
# Settings arrive as JSON in SPOOLAGENT_COLLECTOR_CONFIG; a shell script can pattern-match it.
# It keeps no state, so it prints no checkpoints. Exit 13 tells the agent not to run it again.
set -u

if ! command -v df >/dev/null 2>&1; then
    echo "disk_usage: no df on this host" >&2
    exit 13
fi

case "${SPOOLAGENT_COLLECTOR_CONFIG:-}" in
    *'"format":"raw"'* | *'"format": "raw"'*) prefix="" ;;
    *) prefix="disk_usage $(date +%Y-%m-%d) " ;;
esac

# -P: one line per file system, fixed columns; -k: 1024-byte blocks. Mount points with spaces
# would shift the columns, so they are skipped rather than misreported.
df -P -k | awk -v prefix="$prefix" 'NR > 1 && NF == 6 {
    pct = $5; sub(/%/, "", pct)
    printf "%smount=%s fs=%s size_kb=%s used_kb=%s avail_kb=%s used_pct=%s\n", prefix, $6, $1, $2, $3, $4, pct
}'
