"""listchecker: white and black lists of strings, IP ranges or patterns (Mixer's list adapter)."""

from mixerhub.adapter import AdapterInfo

from .config import ListParams, validate
from .handler import ListHandler, build

INFO = AdapterInfo(
    name="listchecker",
    description="Checks whether an entry is present in a list",
    templates=("listentry",),
    params=ListParams,
    build=build,
    validate=validate,
)

__all__ = ["INFO", "ListHandler", "ListParams"]
