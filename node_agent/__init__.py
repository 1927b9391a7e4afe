"""node-agent: reconcile registry pull credentials into a node's containerd and kubelet files."""
