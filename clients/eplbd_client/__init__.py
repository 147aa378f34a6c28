"""eplbd's rank client: what an inference rank links (torch).

- :class:`EplbClient` (:mod:`.client`): record, sync/agree, transfer, commit.
- :class:`ExpertHost` (:mod:`.host`): the seam an engine implements.
- :class:`LoadRecorder` (:mod:`.recorder`), :mod:`.control` (control words and
  the agreement rule), :mod:`.transfer` (the transfer executor),
  :mod:`.testing` (a tiny EP MoE model and a multi-process launcher).
"""

from .client import ClientConfig, ClientStats, EplbClient
from .host import ExpertHost, LayerTables
from .recorder import LoadRecorder

__all__ = ["ClientConfig", "ClientStats", "EplbClient", "ExpertHost", "LayerTables", "LoadRecorder"]
