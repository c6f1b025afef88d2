"""Split-merge on the cluster: a run's ODM sends its submodels to the gateway as child tasks.

ODM cuts a ``--split N`` dataset into submodels and, with ``--sm-cluster URL``, sends each as an
ordinary task to a NodeODM API at ``URL`` (ODM's ``opendm/remote.py``; docs/split-merge.md). The
scheduler points a splitting run's ODM at the gateway (``SplitSettings.cluster_url``), so every
submodel becomes its own task and run, admitted, sized and observed like any other.

**The parent-scoped token.** The URL carries ``?token=`` (PyODM's ``Node.from_url`` reads it):
``sm.<parent uuid>.<HMAC-SHA256(key, parent)>``, a token that names its parent and that only
the holder of ``SplitSettings.token_key`` (gateway and scheduler) can make. The gateway accepts
it while the parent is queued or running, as the parent's tenant limited to the parent's
children: tasks it creates are the parent's **children** (``parent`` on their documents), and it
sees and acts on those only. Once the parent has ended or is gone the token is refused with
NodeODM's token error. Nothing is stored: the key and the parent's state decide.

**The family.** A child is a task like any other (its own size class, the tenant's limits and
quota). The scheduler's admission pass (``scheduler/admission.py``) ends the children a parent
left behind: a child still queued or running whose parent has ended is canceled, and one whose
parent was removed is removed, so a killed pod, a killed scheduler or a child created while its
parent was being canceled leaves no orphan.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Final

from pydantic import SecretStr

__all__ = [
    "SCOPED_PREFIX",
    "SEED_NAME",
    "cluster_url",
    "parent_of",
    "scoped_token",
    "splits",
]

SCOPED_PREFIX: Final = "sm."
# The upload ODM's client seeds a submodel's project with (docs/split-merge.md): extracted into
# the project root by the run's fetch step, never an image. Exactly, case-sensitive, as NodeODM.
SEED_NAME: Final = "seed.zip"
_CONTEXT: Final = b"scaleodm split-merge parent v1\x00"
_SCOPED = re.compile(r"^sm\.([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\."
                     r"([0-9a-f]{64})$")


def _mac(key: SecretStr, parent: str) -> str:
    return hmac.new(key.get_secret_value().encode(), _CONTEXT + parent.encode(),
                    hashlib.sha256).hexdigest()


def scoped_token(key: SecretStr, parent: str) -> str:
    """The token a splitting run of ``parent`` gives its ODM."""
    return f"{SCOPED_PREFIX}{parent}.{_mac(key, parent)}"


def parent_of(key: SecretStr | None, token: str | None) -> str | None:
    """The parent uuid ``token`` is scoped to, when it is one and signed with ``key``; else
    None. The signature is compared in constant time."""
    if key is None or not token or not token.startswith(SCOPED_PREFIX):
        return None
    m = _SCOPED.match(token)
    if m is None:
        return None
    parent, mac = m.groups()
    return parent if hmac.compare_digest(mac, _mac(key, parent)) else None


def _names(options: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {str(o.get("name")): o.get("value") for o in options}


def splits(options: Iterable[Mapping[str, Any]]) -> bool:
    """Whether a run with these (validated NodeODM) options splits onto the cluster: ``split``
    is set and the user gave no ``sm-cluster`` of their own."""
    named = _names(options)
    return named.get("split") not in (None, False, 0, "") and not named.get("sm-cluster")


def cluster_url(base: str, token: str) -> str:
    """``base`` (the gateway as runs see it) with ``?token=``, as ODM's ``--sm-cluster``."""
    parts = urllib.parse.urlsplit(base.rstrip("/"))
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, parts.path, urllib.parse.urlencode({"token": token}), ""))
