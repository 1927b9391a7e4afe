"""What the tests share, one of each:

- `node`: a node's files under tmp_path (`NodeTree`) with foreign content to keep;
- `dockerconfig`: docker config documents and dockerconfigjson Secret data;
- `settings`: the Secret the daemon follows, its settings for a node tree and its timings;
- `agent`: the agent under test in this process (`Agent`) or as a child (`AgentProcess`);
- `waiting`: waiting for a condition (`wait_until`);
- `cri`: a fake CRI on a short socket path (`fake_cri_socket`).
"""
