"""Fleet-safe containerd restarts: at most N nodes restart containerd at once, each holding
one of N `coordination.k8s.io/v1` Leases `node-agent-restart-<i>` (docs/restart-slots.md).

`leases` is the pure part (slot order, expiry on the local monotonic clock, Lease bodies);
`coordinator` the thread that talks to the API. Only the daemon uses them.
"""
