"""The performance model: every cost formula lives here once (see ../shared/perf-reference.md).

Conventions, stated once: FLOPs count a multiply-add as 2; bandwidths are bytes/s; collective
bandwidth `bw` is each device's one-way (egress) bandwidth, as in NCCL's tests; times are seconds.
"""
