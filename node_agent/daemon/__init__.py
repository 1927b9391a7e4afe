"""`node-agent run`: the loop around one reconcile.

Data flow::

    SecretWatcher (one per --secret) ──SecretSnapshot──▶ sources.CredentialSources ─┐
    file_watch (parent dirs of config.toml, config.json, each --secret-file) ───────┤
    resync timer, deferred containerd restart, retry ───────────────────────────────┤
                                                                                     ▼
                              work_queue.WorkQueue (coalesces, debounces) ──Batch──▶ worker.Worker
                                                                                     │
                 targets.NodeTargets (Reconciler: plan, write, restart, roll back) ◀─┘
                                                                                     │
                     report.DaemonReporter ◀──PassReport─────────────────────────────┘
                       ├─ metrics (AgentMetrics, served by StatusServer)
                       ├─ Events on the Node (NodeEventRecorder)
                       └─ readiness (Health)

Modules: `work_queue` (one queue, timing rule), `sources` (last good credentials per source),
`file_watch` (watchdog on directories), `restarts` (rate limit and outcome of containerd
restarts), `outcomes` (pure: drift, in-sync, fingerprints), `targets` (reconcilers),
`worker` (one pass), `report` (metrics, Events, readiness), `daemon` (composition, threads),
`run` (building from settings, signals, exit code).
"""
