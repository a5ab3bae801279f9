"""The torchstow names the kit needs beyond the top-level package and the plugin SDK
(:mod:`torchstow.spi`), imported in one place: when an internal moves, only this
module changes."""

from torchstow.core.planning import LoadItemType
from torchstow.format.chunks import overlap
from torchstow.format.files import is_chunk_table
from torchstow.format.manifest import StorageInfo
from torchstow.plugins.manager import scheme_of

__all__ = ["LoadItemType", "StorageInfo", "is_chunk_table", "overlap", "scheme_of"]
