"""stdio: writes logentry and metric instances to stdout, stderr or a rotated file."""

from mixerhub.adapter import AdapterInfo

from .config import StdioParams
from .handler import StdioHandler, build

INFO = AdapterInfo(
    name="stdio",
    description="Writes logs and metrics to a standard I/O stream",
    templates=("logentry", "metric"),
    params=StdioParams,
    build=build,
)

__all__ = ["INFO", "StdioHandler", "StdioParams"]
