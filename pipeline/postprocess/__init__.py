"""After the network: back to the source grid, label decision, small-component removal."""

from pipeline.postprocess.components import label_components, remove_small_components
from pipeline.postprocess.invert import ToSourceGrid

__all__ = ["ToSourceGrid", "label_components", "remove_small_components"]
