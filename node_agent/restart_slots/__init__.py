"""Fleet-safe containerd restarts: at most N nodes restart containerd at once, each holding
one of N `coordination.k8s.io/v1` Leases `node-agent-restart-<i>` (docs/restart-slots.md).

Pure: `machine` (the slot's states and transitions), `leases` (slot order, expiry on the
local monotonic clock, Lease bodies) and `config` (the settings). API calls: `acquirer`
(seeking a slot: list, claim, watch) and `holder` (keeping one: renew, release, read back).
`coordinator.RestartSlots` is what the daemon uses: the thread that feeds the machine and
carries out its actions through those two. Only the daemon uses them.
"""
