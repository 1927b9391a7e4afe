"""node-agent: reconcile registry pull credentials into a node's containerd and kubelet files."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("node-agent")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
