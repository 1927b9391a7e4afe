"""Recovering pods stuck on image pulls once the node has their registry's credentials
(`--recover-stuck-pods`).

A pod scheduled before its registry's credentials reached the node fails with ErrImagePull
and waits in ImagePullBackOff, whose delay doubles up to 5 minutes. Once a pass has made the
credentials effective on this node, a pod with a controller is evicted (its controller makes
a new one, whose pull succeeds at once) and a pod without one is told, through an Event, that
deleting it retries the pull now.

- `images`: *pure*, which registry an image is pulled from and which credential key serves it.
- `decisions`: *pure*, when a change is effective, which pods are stuck on what, what to do
  with each, and the eviction budget.
- `recovery`: the thread that turns effective changes into rounds of pod list and eviction
  calls through `node_agent.kube`.
"""
