"""Which registry an image is pulled from, and whether a credential key serves it. Pure.

The registry of an image is named the way Secret keys are (`normalise_registry`): host
lower-cased, port kept, Docker Hub under one name. A credential key serves an image's
registry the way kubelet matches config.json keys (docs/node-facts.md#kubelet-key-matching):
each dot-label of the key is a glob (`*.example.com` matches `a.example.com`, not
`example.com`) and the port must be the same.
"""

from fnmatch import fnmatchcase

from node_agent.credentials import DOCKER_HUB, normalise_registry

_LOCALHOST = "localhost"


def image_registry(image: str) -> str | None:
    """The normalised registry `image` is pulled from; None when the reference names no
    usable host. `nginx`, `library/nginx` and `team/app` are Docker Hub images: the first
    path component is a registry only if it has a dot, a port or is `localhost` (the rule of
    the docker reference grammar that kubelet and containerd share)."""
    first, slash, _ = image.partition("/")
    if not slash or not _names_a_host(first):
        return DOCKER_HUB
    try:
        return normalise_registry(first)
    except ValueError:
        return None


def serves(key: str, registry: str) -> bool:
    """Whether the credential for `key` (a normalised registry, possibly with `*` labels) is
    the one pulls from `registry` (a normalised image registry) use."""
    key_host, key_port = _split_port(key)
    host, port = _split_port(registry)
    if key_port != port:
        return False
    key_labels, labels = key_host.split("."), host.split(".")
    return len(key_labels) == len(labels) and all(
        _label_matches(pattern, label) for pattern, label in zip(key_labels, labels, strict=True)
    )


def _label_matches(pattern: str, label: str) -> bool:
    # `*` is the only wildcard a normalised key can hold; a bracketed IPv6 host must not be
    # read as a glob character class.
    return pattern == label or ("*" in pattern and fnmatchcase(label, pattern))


def _names_a_host(component: str) -> bool:
    return "." in component or ":" in component or component == _LOCALHOST


def _split_port(registry: str) -> tuple[str, str | None]:
    """`host:port` → (host, port); a bracketed IPv6 host keeps its colons."""
    host, colon, port = registry.rpartition(":")
    if not colon or "]" in port:
        return registry, None
    return host, port
