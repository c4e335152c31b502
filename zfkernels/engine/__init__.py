"""The deconvnet engine (docs/engine.md): graph capture (:mod:`.capture`), the forward walker
(:mod:`.walk`), the rules, one per step kind in one table (:mod:`.rules`), boxes and signals
(:mod:`.boxes`), geometry per input size (:mod:`.geometry`), the projection plan (:mod:`.plan`),
the CPU fast paths (:mod:`.fastpaths`) and :class:`Deconvnet` itself (:mod:`.deconvnet`)."""

from .capture import Graph, graph_of, layer_aliases, projectable_layers, unknown_layer_message
from .classify import Unsupported
from .deconvnet import MODES, Deconvnet, Recording
from .geometry import Geometry, ModelGeometry
from .walk import walk

__all__ = ["Deconvnet", "Geometry", "Graph", "ModelGeometry", "MODES", "Recording", "Unsupported", "graph_of", "layer_aliases",
           "projectable_layers", "unknown_layer_message", "walk"]
