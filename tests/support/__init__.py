"""What the tests share, one of each: waiting for a condition (`waiting`), a fake CRI on a
short socket path (`fake_cri_socket`). The node tree, the agent harnesses and the Secret
builders still live in `campaign.py` and `daemon_harness.py`."""
