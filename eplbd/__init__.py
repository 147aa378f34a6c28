"""eplbd: expert-parallel load balancing for MoE inference without stop-the-world pauses."""

from eplbd.geometry import Geometry, GeometryError

__version__ = "0.1.0"
__all__ = ["Geometry", "GeometryError", "__version__"]
