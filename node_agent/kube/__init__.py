"""Reading credentials Secrets through the Kubernetes API.

Data flow::

    API server ──list/watch──▶ client.KubeApi ──WatchEvent / ObjectList──▶
        secret_watch.SecretWatcher ──SecretSnapshot──▶ on_change (the daemon's queue)
                                   └─ reason ────────▶ on_error, on_watch_restart (metrics)

`client` is the only module that imports the `kubernetes` package; `model` holds the plain
types the others exchange; `errors` the agent's own error types for API failures.
"""
